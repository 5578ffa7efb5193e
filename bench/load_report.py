"""The load benchmark's report: the markdown summary and table, and the latency/throughput plot."""

from __future__ import annotations

from pathlib import Path

from bench.measure import save_figure


def markdown(report: dict) -> str:
    o, c = report["overhead"], report["capacity"]
    lines = [
        "The load generator is **open-loop**: " + report["generator"] + ".",
        "",
        f"HTTP+JSON overhead (one request at a time, {o['requests']} requests per run, cached image, text cache "
        f"off; {o['runs']} independent runs, each with freshly started servers; medians over the runs): "
        + "; ".join(
            f"{name}: service p50 {o['p50_ms'][name]:.2f} ms - bare call p50 {o['p50_ms']['bare runtime call']:.2f} ms "
            f"= **{o['overhead_p50_ms'][name]:.2f} ms**{spread(o, name)} "
            f"(GET /healthz p50 {o['p50_ms'][name + ' GET /healthz']:.2f} ms; "
            f"the same POST through httpx p50 {o['p50_ms'].get(name + ' via httpx', float('nan')):.2f} ms)"
            for name in o["overhead_p50_ms"]
        ),
        "",
        f"Throughput at {c['connections']} concurrent clients (offered {c['offered_rps']:.0f} req/s, cached images"
        + ("" if c.get("saturated", True) else "; NOT saturated: the servers may do more")
        + "): "
        + ", ".join(f"{name} {v:.1f} req/s" for name, v in c["throughput_rps"].items())
        + f"; ratio on/off **{c['ratio_on_over_off']:.2f}x** (median of paired runs).",
        "",
        low_load_line(report["low_load"]),
        "",
        *breakdown_table(c, report["machine"]["cores"]),
        "| images | server | n | offered/s | done/s | p50 ms | p95 ms | p99 ms | max ms | errors | batch | saturated |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(report["sweep"], key=lambda r: (r["images"], r["server"], r["rate_rps"])):
        cells = [r["images"], r["server"], str(r["requests"])]
        cells += [f"{r[k]:.1f}" for k in ("offered_rps", "throughput_rps", "p50_ms")]
        cells += [f"{r[k]:.1f}" for k in ("p95_ms", "p99_ms", "max_ms")]
        cells += [f"{100 * r['error_ratio']:.1f}%", f"{r['mean_batch']:.1f}", "yes" if r["saturated"] else "no"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def spread(overhead: dict, name: str) -> str:
    runs = overhead["overhead_p50_ms_runs"][name]
    if len(runs) < 2:
        return ""
    return f" [{min(runs):.2f}, {max(runs):.2f}] (runs: {', '.join(f'{x:.2f}' for x in runs)})"


def low_load_line(ll: dict) -> str:
    p95 = ", ".join(f"{name} {' / '.join(f'{x:.1f}' for x in xs)} ms" for name, xs in ll["p95_ms"].items())
    return (
        f"p95 at low load ({ll['fraction_of_capacity']:g} of capacity, {ll['rate_rps']:.0f} req/s, cached images, "
        f"{len(ll['ratios'])} paired runs of {ll['duration_s']:.0f} s, alternating which server goes first): {p95}; "
        f"with batching / without: **{ll['p95_ratio_on_over_off']:.2f}x** (median of the pairs; "
        f"range {min(ll['ratios']):.2f}-{max(ll['ratios']):.2f})."
    )


def breakdown_table(capacity: dict, cores: int) -> list[str]:
    """Where an answered request's time goes at 32 concurrent clients, per server (medians over the runs)."""
    parts = {name: b for name, b in capacity["breakdown"].items() if b}
    if not parts:
        return []
    stages = list(next(iter(parts.values()))["stage_ms"])
    lines = [
        f"Where an answered request's time goes at {capacity['connections']} concurrent clients (per request, "
        "medians over the capacity runs). CPU from /proc: the server's event-loop thread (HTTP, the framework, "
        "batching) and its other threads (the models); stage times from the server's /metrics (a batched stage's "
        "time shared by its rows); the load generator runs on the same cores. Requests/s these CPU costs allow on "
        f"{cores} cores: cores x 1000 / (server + client CPU ms).",
        "",
        "| server | done/s | server ms | loop CPU ms | other CPU ms | "
        + " | ".join(f"{s} ms" for s in stages)
        + " | client CPU ms | CPU-bound req/s |",
        "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in stages) + " | --- | --- |",
    ]
    for name, b in parts.items():
        cpu = b["server_loop_cpu_ms"] + b["server_other_cpu_ms"] + b["client_cpu_ms"]
        cells = [name, f"{capacity['throughput_rps'][name]:.0f}", f"{b['server_ms']:.2f}"]
        cells += [f"{b['server_loop_cpu_ms']:.3f}", f"{b['server_other_cpu_ms']:.3f}"]
        cells += [f"{b['stage_ms'][s]:.3f}" for s in stages]
        cells += [f"{b['client_cpu_ms']:.3f}", f"{cores * 1000 / cpu:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    styles = {"batching on": "-", "batching off": "--"}
    colors = {"cached": "tab:green", "uploaded": "tab:blue"}
    for kind in ("cached", "uploaded"):
        for server, style in styles.items():
            rs = sorted(
                (r for r in report["sweep"] if r["images"] == kind and r["server"] == server),
                key=lambda r: r["rate_rps"],
            )
            if not rs:
                continue
            x = [r["offered_rps"] for r in rs]
            label = f"{kind}, {server}"
            left.plot(x, [r["p50_ms"] for r in rs], style, color=colors[kind], marker="o", ms=3, label=f"p50 {label}")
            left.plot(
                x,
                [r["p99_ms"] for r in rs],
                style,
                color=colors[kind],
                marker="^",
                ms=3,
                alpha=0.5,
                label=f"p99 {label}",
            )
            right.plot(x, [r["throughput_rps"] for r in rs], style, color=colors[kind], marker="o", ms=3, label=label)
    left.set_yscale("log")
    left.set_xlabel("offered req/s (open-loop)")
    left.set_ylabel("latency ms (log)")
    left.legend(fontsize=6)
    right.set_xlabel("offered req/s (open-loop)")
    right.set_ylabel("completed req/s")
    right.legend(fontsize=6)
    fig.suptitle("dide-serve under open-loop load", fontsize=10)
    save_figure(fig, path)
