"""Service under load: the open-loop generator (bench/loadgen.py) against real `dide-serve` processes on 127.0.0.1.

    python -m bench.load [--quick] [--size small] [--bundle DIR] [--arrivals poisson|fixed]

Each run is bounded in duration and in request count; latency is counted from each request's due time.

Two servers run side by side, micro-batching on and off (DIDE_BATCHING), with the text-embedding
cache off (DIDE_TEXT_CACHE_SIZE=0, so every request runs the text tower), and are measured alternately
(A B A B ...):
1. HTTP+JSON overhead: one request at a time, POST /vqa with a cached image id, interleaved with the
   bare runtime call for the same request (tokenise, text tower, head via export.runtime.Bundle, in
   this process); overhead = service p50 - bare p50. Measured in 3 independent runs, each with freshly
   started servers; the median and the spread are reported.
2. Throughput at 32 concurrent clients: arrivals far above capacity through 32 connections; completed
   requests per second, batching on vs off, and where a request's time goes: CPU per answered request
   in the server's event-loop thread (HTTP, the framework, batching) and in its other threads (the
   models), each model stage's time per request (the server's /metrics), and the load generator's CPU.
3. p95 at low load (0.05 of capacity), batching on vs off, in paired runs.
4. A sweep of arrival rates (fractions of the batching-on capacity), cached image ids vs uploaded
   base64 images (each upload a distinct image, so it is decoded and encoded): p50/p95/p99/max latency,
   throughput, error ratio, and the mean micro-batch size (from the server's /metrics).
Writes bench/results/load.json, load.md and load.png. The client shares the machine with the server.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import easy_vqa
import httpx
import uvloop

from bench.images import b64, distinct_pngs
from bench.load_report import markdown, plot
from bench.loadgen import RawClient, arrival_times, open_loop, summarize
from bench.measure import RESULTS, configure_logging, header, percentile, write_results
from bench.server import (
    LiveServer,
    cpu_seconds,
    random_bundle,
    sample,
    server_env,
    start_server,
    stop_server,
    wait_ready,
)
from export.runtime import Bundle

log = logging.getLogger(__name__)

CONCURRENT_CLIENTS = 32
READY_TIMEOUT_S = 300.0
SATURATED_THROUGHPUT = 0.9  # a run is saturated below this fraction of its offered rate ...
SATURATED_ERRORS = 0.01  # ... or above this error ratio
PROBE_OVER_SEQUENTIAL = 8.0
LOW_LOAD = 0.05  # of the capacity at 32 connections: the rate of the low-load p95 comparison
QUESTIONS = ("what is the red shape?", "what color is the shape?", "is there a circle in the image?")


# --- the servers -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def servers(bundle: Path, work: Path, modes: dict[str, bool]) -> Iterator[dict[str, LiveServer]]:
    """One `dide-serve` subprocess per mode (name -> batching on?), each with its own store; stopped on exit."""
    started: dict[str, LiveServer] = {}
    work.mkdir(parents=True, exist_ok=True)
    try:
        for name, batching in modes.items():
            slug = name.replace(" ", "-")
            store = work / f"store-{slug}"
            env = server_env([bundle], store, batching=batching, text_cache_size=0, log_level="WARNING")
            started[name] = start_server(env, work / f"server-{slug}.log")
        for server in started.values():
            wait_ready(server, READY_TIMEOUT_S)
        yield started
    finally:
        for server in started.values():
            stop_server(server)


STAGES = ("lookup", "tokenize", "text_encode", "head")


def counters(server: LiveServer) -> dict[str, float]:
    """A server's cumulative counters: CPU seconds (event-loop thread, every thread), /vqa requests answered
    and their summed time in the server, each stage's summed time, and rows and calls through the head."""
    text = httpx.get(server.url + "/metrics", timeout=10.0).text
    vqa = '{endpoint="/vqa",status_class="2xx"}'
    pid = server.process.pid
    out = {
        "loop_cpu_s": cpu_seconds(pid, pid),
        "cpu_s": cpu_seconds(pid),
        "requests": sample(text, f"dide_request_duration_seconds_count{vqa}"),
        "request_s": sample(text, f"dide_request_duration_seconds_sum{vqa}"),
        "head_rows": sample(text, 'dide_batch_size_sum{model="head"}'),
        "head_calls": sample(text, 'dide_batch_size_count{model="head"}'),
    }
    return out | {f"{s}_s": sample(text, f'dide_stage_duration_seconds_sum{{stage="{s}"}}') for s in STAGES}


def wait_idle(server: LiveServer, timeout_s: float = 120.0) -> float:
    """Wait until the server answers nothing but this probe (a run cut short leaves a backlog that would
    otherwise be served during the next run); the seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        text = httpx.get(server.url + "/metrics", timeout=10.0).text
        if sample(text, "dide_inflight_requests") <= 1:  # the /metrics request itself
            break
        time.sleep(0.1)
    return time.monotonic() - start


def breakdown(before: dict[str, float], after: dict[str, float], client_cpu_s: float) -> dict:
    """Per answered request over one run: server CPU by thread, time in the server and in each stage, client CPU."""
    d = {k: after[k] - before[k] for k in after}
    n = d["requests"]
    if not n:
        return {"requests": 0}
    return {
        "requests": int(n),
        "server_loop_cpu_ms": 1000 * d["loop_cpu_s"] / n,
        "server_other_cpu_ms": 1000 * (d["cpu_s"] - d["loop_cpu_s"]) / n,
        "server_ms": 1000 * d["request_s"] / n,
        "stage_ms": {s: 1000 * d[f"{s}_s"] / n for s in STAGES},
        "client_cpu_ms": 1000 * client_cpu_s / n,
    }


# --- requests -------------------------------------------------------------------------------------------


def vqa_body(image: dict, i: int) -> bytes:
    return json.dumps({**image, "question": QUESTIONS[i % len(QUESTIONS)], "top_k": 3}).encode()


# --- the benchmark --------------------------------------------------------------------------------------


@dataclass
class Plan:
    duration_s: float
    min_requests: int
    max_requests: int
    drain_s: float
    overhead_requests: int
    overhead_runs: int  # each with freshly started servers
    capacity_repeats: int
    low_load_repeats: int
    sweep_fractions: tuple[float, ...]
    sweep_repeats: int


# Sweep rates are fractions of the capacity at 32 connections (the better of on and off).
QUICK = Plan(3.0, 40, 20000, 2.0, 100, 3, 2, 2, (0.1, 0.5, 1.0, 2.0, 3.0), 1)
FULL = Plan(10.0, 300, 40000, 10.0, 500, 3, 5, 6, (0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0, 1.2, 1.5, 2.0, 3.0), 1)


class LoadBench:
    def __init__(self, args: argparse.Namespace, plan: Plan, bundle_dir: Path, servers: dict[str, LiveServer]) -> None:
        self.args = args
        self.plan = plan
        self.servers = servers
        # One intra-op thread, so that no ONNX Runtime pool threads, which spin after each call, steal CPU
        # from the server under test between requests.
        self.bundle = Bundle.load(bundle_dir, threads=1)
        self.image_paths = sorted(easy_vqa.get_test_image_paths().values())[:32]
        self.upload_base = Path(self.image_paths[0]).read_bytes()
        self.uploaded = 0  # distinct images sent so far, over every run and server
        self.image_ids: dict[str, list[str]] = {}
        self.seed = 0

    async def setup(self) -> None:
        """Upload the cached images to every server (their embeddings go to its store)."""
        async with httpx.AsyncClient(timeout=60.0) as client:
            for name, server in self.servers.items():
                ids = []
                for path in self.image_paths:
                    data = b64(Path(path).read_bytes())
                    r = await client.post(server.url + "/images", json={"image": data})
                    r.raise_for_status()
                    ids.append(r.json()["image_id"])
                self.image_ids[name] = ids

    def body(self, server: str, kind: str, n: int) -> Callable[[int], bytes]:
        if kind == "cached":
            ids = self.image_ids[server]
            return lambda i: vqa_body({"image_id": ids[i % len(ids)]}, i)
        images = distinct_pngs(self.upload_base, self.uploaded, n)
        self.uploaded += n
        return lambda i: vqa_body({"image": b64(images[i])}, i)

    async def run(
        self, server: str, kind: str, rate: float, connections: int, duration_s: float, drain_s: float
    ) -> dict:
        self.seed += 1
        times = arrival_times(rate, duration_s, self.plan.max_requests, self.args.arrivals, self.seed)
        url = self.servers[server].url
        waited = wait_idle(self.servers[server])
        if waited > 1.0:
            log.info("%s: waited %.1f s for the previous run's backlog", server, waited)
        before, cpu0 = counters(self.servers[server]), time.process_time()
        client = RawClient(url)
        try:
            outcomes, lags = await open_loop(
                client,
                "/vqa",
                self.body(server, kind, len(times)),
                times,
                connections=connections,
                drain_s=drain_s,
            )
        finally:
            await client.aclose()
        client_cpu_s = time.process_time() - cpu0
        after = counters(self.servers[server])
        calls = after["head_calls"] - before["head_calls"]
        result = {
            "server": server,
            "images": kind,
            "rate_rps": rate,
            "connections": connections,
            "duration_s": duration_s,
            **summarize(outcomes, lags, duration_s),
            "mean_batch": (after["head_rows"] - before["head_rows"]) / calls if calls else float("nan"),
            "breakdown": breakdown(before, after, client_cpu_s),
        }
        result["saturated"] = bool(
            result["throughput_rps"] < SATURATED_THROUGHPUT * result["offered_rps"]
            or result["error_ratio"] > SATURATED_ERRORS
        )
        log.info(
            "%-13s %-8s %7.1f req/s offered: %7.1f/s done, p50 %7.1f ms, p99 %7.1f ms, errors %.1f%%, batch %.1f",
            server,
            kind,
            result["offered_rps"],
            result["throughput_rps"],
            result["p50_ms"],
            result["p99_ms"],
            100 * result["error_ratio"],
            result["mean_batch"],
        )
        return result

    async def overhead(self) -> dict:
        """Service p50 (one request at a time) minus the bare runtime call p50, interleaved, per server."""
        question = QUESTIONS[0]
        vector = self.bundle.encode_images(self.bundle.preprocess_images([Path(self.image_paths[0]).read_bytes()]))

        def bare() -> None:
            ids, mask = self.bundle.tokenize([question])
            self.bundle.head(self.bundle.encode_tokens(ids, mask), vector)

        samples: dict[str, list[float]] = {"bare runtime call": []}
        for name in self.servers:
            samples |= {name: [], f"{name} GET /healthz": [], f"{name} via httpx": []}
        raw = {name: RawClient(s.url) for name, s in self.servers.items()}
        clients = {name: httpx.AsyncClient(base_url=s.url, timeout=30.0) for name, s in self.servers.items()}
        bodies = {
            name: json.dumps({"image_id": self.image_ids[name][0], "question": question, "top_k": 3}).encode()
            for name in self.servers
        }
        headers = {"content-type": "application/json"}

        async def timed(call: Awaitable[int | httpx.Response]) -> float:
            t0 = time.perf_counter()  # a coroutine does nothing until awaited
            result = await call
            elapsed = time.perf_counter() - t0
            if (result if isinstance(result, int) else result.status_code) != 200:
                raise RuntimeError(f"overhead request answered {result}")
            return elapsed

        try:
            for i in range(self.plan.overhead_requests + 5):  # the first 5 rounds warm up connections
                for name, client in clients.items():
                    service_s = await timed(raw[name].request("POST", "/vqa", bodies[name]))
                    t1 = time.perf_counter()
                    bare()
                    bare_s = time.perf_counter() - t1
                    health_s = await timed(raw[name].request("GET", "/healthz"))
                    httpx_s = await timed(client.post("/vqa", content=bodies[name], headers=headers))
                    if i >= 5:
                        samples[name].append(service_s)
                        samples["bare runtime call"].append(bare_s)
                        samples[f"{name} GET /healthz"].append(health_s)
                        samples[f"{name} via httpx"].append(httpx_s)
        finally:
            for c in [*clients.values(), *raw.values()]:
                await c.aclose()
        p50 = {name: 1000 * statistics.median(xs) for name, xs in samples.items()}
        return {
            "requests": self.plan.overhead_requests,
            "question": question,
            "p50_ms": p50,
            "p95_ms": {name: percentile([1000 * x for x in xs], 95) for name, xs in samples.items()},
            "overhead_p50_ms": {name: p50[name] - p50["bare runtime call"] for name in self.servers},
            "bare_call": "Bundle.tokenize + encode_tokens (text tower) + head, in the client process, same bundle, "
            "one intra-op thread",
            "healthz": "GET /healthz on the same connection: the HTTP round trip with no model work, for scale",
            "client": "service p50 through RawClient (one keep-alive connection, request bytes built in advance); "
            "'via httpx' is the same request through httpx.AsyncClient, for scale: the client's own cost",
        }

    async def capacity(self, sequential_p50_ms: float) -> dict:
        """Completed requests/s through 32 connections with arrivals above capacity, on vs off, alternating.

        The offered rate (unless --probe-rate) is PROBE_OVER_SEQUENTIAL times what one connection gets
        sequentially: enough to keep 32 connections busy, without a flood of pending arrivals whose
        bookkeeping would take CPU from the server on a small machine. `saturated` says if it was enough.
        """
        probe_rate = self.args.probe_rate or min(2000.0, max(50.0, PROBE_OVER_SEQUENTIAL * 1000 / sequential_p50_ms))
        runs: dict[str, list[dict]] = {name: [] for name in self.servers}
        for _ in range(self.plan.capacity_repeats):
            for name in self.servers:
                # No drain: the backlog left at the end of the window is cut; only completions count.
                runs[name].append(
                    await self.run(name, "cached", probe_rate, CONCURRENT_CLIENTS, self.plan.duration_s, 0.0)
                )
        throughput = {name: [r["throughput_rps"] for r in rs] for name, rs in runs.items()}
        names = list(self.servers)
        ratio = statistics.median(a / b for a, b in zip(throughput[names[0]], throughput[names[1]], strict=True))
        return {
            "connections": CONCURRENT_CLIENTS,
            "offered_rps": probe_rate,
            "throughput_rps": {name: statistics.median(xs) for name, xs in throughput.items()},
            "ratio_on_over_off": ratio,
            "saturated": all(r["saturated"] for rs in runs.values() for r in rs),
            "breakdown": {name: median_breakdown([r["breakdown"] for r in rs]) for name, rs in runs.items()},
            "runs": runs,
        }

    async def low_load(self, reference_rps: float) -> dict:
        """p95 at LOW_LOAD of capacity, cached images, batching on vs off: paired runs, each pair in the order
        opposite to the last (so neither server always follows the other), and the median of the ratios."""
        rate, names = LOW_LOAD * reference_rps, list(self.servers)
        duration = max(self.plan.duration_s, self.plan.min_requests / rate)
        runs: dict[str, list[dict]] = {name: [] for name in names}
        for i in range(self.plan.low_load_repeats):
            for name in names if i % 2 == 0 else names[::-1]:
                runs[name].append(
                    await self.run(name, "cached", rate, self.args.connections, duration, self.plan.drain_s)
                )
        p95 = {name: [r["p95_ms"] for r in rs] for name, rs in runs.items()}
        ratios = [a / b for a, b in zip(p95[names[0]], p95[names[1]], strict=True)]
        return {
            "fraction_of_capacity": LOW_LOAD,
            "rate_rps": rate,
            "duration_s": duration,
            "p95_ms": p95,
            "p95_ratio_on_over_off": statistics.median(ratios),
            "ratios": ratios,
            "runs": runs,
        }

    async def sweep(self, reference_rps: float) -> list[dict]:
        """Rates as fractions of reference_rps; cached and uploaded images; both servers, alternating.

        The fractions go past 1: with few requests in flight a server answers more than with 32.
        """
        results = []
        p = self.plan
        for _ in range(p.sweep_repeats):
            for fraction in p.sweep_fractions:
                rate = fraction * reference_rps
                duration = min(max(p.duration_s, p.min_requests / rate), 3 * p.duration_s)
                for kind in ("cached", "uploaded"):
                    for name in self.servers:
                        result = await self.run(name, kind, rate, self.args.connections, duration, p.drain_s)
                        results.append({"fraction_of_capacity": fraction, **result})
        return results


def median_breakdown(parts: list[dict]) -> dict:
    """Each figure of breakdown(), the median over repeated runs (runs that answered nothing left out)."""
    parts = [p for p in parts if p["requests"]]
    if not parts:
        return {}
    out: dict = {k: statistics.median(p[k] for p in parts) for k in parts[0] if k != "stage_ms"}
    out["stage_ms"] = {s: statistics.median(p["stage_ms"][s] for p in parts) for s in STAGES}
    return out


def combine_overhead(runs: list[dict]) -> dict:
    """The overhead runs (each with its own servers) as one figure: medians over the runs, and every run."""
    medians = {
        key: {series: statistics.median(run[key][series] for run in runs) for series in runs[0][key]}
        for key in ("p50_ms", "p95_ms", "overhead_p50_ms")
    }
    return {
        **{k: v for k, v in runs[0].items() if k not in medians},
        **medians,
        "runs": len(runs),
        "overhead_p50_ms_runs": {n: [r["overhead_p50_ms"][n] for r in runs] for n in medians["overhead_p50_ms"]},
        "each_run": runs,
    }


async def measure(args: argparse.Namespace, plan: Plan, bundle_dir: Path, work: Path) -> dict:
    modes = {"batching on": True, "batching off": False}
    runs = []
    for i in range(plan.overhead_runs):
        with servers(bundle_dir, work / f"overhead-{i + 1}", modes) as running:
            bench = LoadBench(args, plan, bundle_dir, running)
            await bench.setup()
            runs.append(await bench.overhead())
        log.info("HTTP+JSON overhead at p50, run %d: %s", i + 1, runs[-1]["overhead_p50_ms"])
    overhead = combine_overhead(runs)
    with servers(bundle_dir, work / "load", modes) as running:
        bench = LoadBench(args, plan, bundle_dir, running)
        await bench.setup()
        ready = httpx.get(next(iter(running.values())).url + "/readyz", timeout=10.0).json()
        capacity = await bench.capacity(overhead["p50_ms"]["batching on"])
        log.info("capacity at %d connections: %s", CONCURRENT_CLIENTS, capacity["throughput_rps"])
        reference = max(capacity["throughput_rps"].values())
        low_load = await bench.low_load(reference)
        log.info("p95 at low load, on/off: %.2fx (%s)", low_load["p95_ratio_on_over_off"], low_load["p95_ms"])
        sweep = await bench.sweep(reference)
        server_info = {
            name: {"command": s.command, "env": s.env, "batching": modes[name]} for name, s in running.items()
        }
    return {
        "open_loop": True,
        "generator": (
            "open-loop asyncio + a minimal keep-alive HTTP/1.1 client (RawClient): requests sent at pre-drawn "
            "arrival times "
            f"({args.arrivals}), never paced by completions; latency counted from each request's due time; "
            "runs bounded in duration and request count"
        ),
        "arrivals": args.arrivals,
        "plan": plan.__dict__,
        "provider": ready.get("provider"),
        "servers": server_info,
        "overhead": overhead,
        "capacity": capacity,
        "low_load": low_load,
        "sweep": sweep,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs, 5 rates, 2 capacity repeats")
    parser.add_argument("--size", default="small", help="random-weight student size when no --bundle is given")
    parser.add_argument("--bundle", type=Path, help="serve this bundle instead of a random-weight one")
    parser.add_argument("--arrivals", choices=["poisson", "fixed"], default="poisson", help="arrival process")
    parser.add_argument("--connections", type=int, default=256, help="most requests on the wire in the sweep")
    parser.add_argument(
        "--probe-rate", type=float, help="offered req/s of the capacity runs (default: 8x the sequential rate)"
    )
    parser.add_argument("--duration", type=float, help="seconds per run (default 3 quick, 10 full)")
    parser.add_argument("--fractions", type=float, nargs="+", help="sweep rates as fractions of capacity")
    parser.add_argument("--overhead-requests", type=int, help="requests in each overhead run")
    parser.add_argument("--overhead-runs", type=int, help="overhead runs, each with fresh servers (default 3)")
    parser.add_argument("--work", type=Path, help="where bundles and stores go (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for load.json, .md and .png")
    args = parser.parse_args(argv)
    for flag in ("overhead_requests", "overhead_runs"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    argv = list(sys.argv[1:] if argv is None else argv)
    configure_logging(quiet=("httpx",))
    plan = QUICK if args.quick else FULL
    overrides = {
        "duration_s": args.duration,
        "sweep_fractions": tuple(args.fractions) if args.fractions else None,
        "overhead_requests": args.overhead_requests,
        "overhead_runs": args.overhead_runs,
    }
    plan = Plan(**(plan.__dict__ | {k: v for k, v in overrides.items() if v is not None}))
    with tempfile.TemporaryDirectory(prefix="dide-bench-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        bundle_dir = args.bundle or random_bundle(args.size, work)
        with tempfile.TemporaryDirectory(prefix="load-", dir=work) as run_dir:
            body = uvloop.run(measure(args, plan, bundle_dir, Path(run_dir)))  # the generator costs less CPU
    report = {
        **header("load", argv, quick=args.quick, threads=None, provider=body["provider"] or "unknown"),
        "size": None if args.bundle else args.size,
        "bundle": str(args.bundle) if args.bundle else f"random-weight {args.size} student (bench.models)",
        **body,
    }
    write_results(args.out, "load", report, markdown, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
