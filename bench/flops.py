"""Efficiency against the machine's limit: each tower's achieved FLOP/s as a fraction of this machine's matmul peak.

    python -m bench.flops [--quick] [--sizes small base] [--threads 1]

Counts each tower's FLOPs analytically (2 per multiply-add of every matmul and convolution; softmax,
LayerNorm and GELU are left out, as by torch's FlopCounterMode) and checks the count against
torch.utils.flop_counter.FlopCounterMode; measures the machine's matmul peak (GFLOP/s of large fp32
matmuls, torch and numpy, same thread count) in the same rounds as the towers, interleaved; writes
bench/results/flops.json, flops.md and flops.png.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.measure import (
    RESULTS,
    add_model_grid_args,
    header,
    interleaved,
    save_figure,
    set_threads,
    summary_ms,
    write_results,
)
from bench.models import build_models, bundles, real_request
from export.runtime import Bundle
from training.student import StudentConfig

log = logging.getLogger(__name__)

QUICK_MAX_GFLOP = 100.0  # --quick skips calls over this: the base image tower at batch 32 (~790 GFLOP)


# --- analytic FLOP counts (2 per multiply-add) --------------------------------------------------------


def encoder_flops(tokens: int, hidden: int, intermediate: int, layers: int) -> int:
    """A stack of pre-LN blocks over `tokens` positions plus the pooler on the first token, one example."""
    n, d = tokens, hidden
    per_layer = 8 * n * d * d + 4 * n * n * d + 4 * n * d * intermediate  # q,k,v,out; QK^T and PV; MLP
    return layers * per_layer + 2 * d * d


def patch_flops(image_size: int, patch_size: int, hidden: int) -> int:
    patches = (image_size // patch_size) ** 2
    return 2 * patches * 3 * patch_size * patch_size * hidden


def text_tower_flops(cfg: StudentConfig, batch: int, tokens: int | None = None) -> int:
    """Over `tokens` positions (default: the padded length max_text_len)."""
    n = tokens or cfg.max_text_len
    return batch * encoder_flops(n, cfg.hidden_size, cfg.intermediate_size, cfg.text_layers)


def image_tower_flops(cfg: StudentConfig, batch: int) -> int:
    tokens = cfg.num_patches + 1
    conv = patch_flops(cfg.image_size, cfg.patch_size, cfg.hidden_size)
    return batch * (conv + encoder_flops(tokens, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers))


def head_flops(cfg: StudentConfig, batch: int) -> int:
    """Fusion MLP (2D -> 2D -> D) and the VQA/entailment classifier (D -> 2D -> C)."""
    d, c = cfg.hidden_size, cfg.num_labels
    if cfg.task == "reasoning":
        return batch * (2 * 12 * d * d + 8 * d * d + 4 * d * c)
    return batch * (12 * d * d + 4 * d * d + 4 * d * c)


def teacher_flops(cfg, text_len: int, batch: int) -> int:
    """One ViLT fusion forward (a transformers ViltConfig) over text_len + patches + 1 tokens, VQA head."""
    d, c = cfg.hidden_size, cfg.num_labels
    tokens = text_len + (cfg.image_size // cfg.patch_size) ** 2 + 1
    body = encoder_flops(tokens, d, cfg.intermediate_size, cfg.num_hidden_layers)
    return batch * (patch_flops(cfg.image_size, cfg.patch_size, d) + body + 4 * d * d + 4 * d * c)


def counted_flops(fn: Callable[[], object]) -> int:
    """FLOPs torch's FlopCounterMode sees while fn() runs."""
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        fn()
    return int(counter.get_total_flops())


# --- the machine's matmul peak ------------------------------------------------------------------------


PEAK_LIBRARIES = ("torch", "numpy", "onnxruntime")


def matmul_fns(n: int, threads: int) -> dict[str, Callable[[], object]]:
    """One n x n fp32 matmul (2 n^3 FLOPs) in torch, numpy and ONNX Runtime (a one-node MatMul graph)."""
    import onnx
    from onnx import TensorProto, helper

    a, b = torch.randn(n, n), torch.randn(n, n)
    x, y = a.numpy().copy(), b.numpy().copy()
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "matmul",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [n, n]) for name in ("a", "b")],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return {
        "peak torch": lambda: torch.mm(a, b),
        "peak numpy": lambda: np.matmul(x, y),
        "peak onnxruntime": lambda: session.run(None, {"a": x, "b": y}),
    }


# --- the benchmark ------------------------------------------------------------------------------------


def tower_fns(size: str, batches: list[int], work: Path, threads: int, max_gflop: float | None):
    """(fns, rows, skipped): a timing closure per (tower, runtime, batch), and the rows to fill."""
    models = build_models(size)
    model, cfg = models.student, models.student.config
    bundle = Bundle.load(bundles(models, work)["deep", "fp32"], ["CPUExecutionProvider"], threads=threads)
    request = real_request(models.text, cfg.image_size)
    one = [torch.from_numpy(x) for x in request.batch(1)]
    fns: dict[str, Callable[[], object]] = {}
    rows: list[dict] = []
    skipped: list[dict] = []
    for batch in batches:
        ids, mask, pixels = request.batch(batch)
        t_ids, t_mask, t_pixels = torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(pixels)
        per_tower = {
            "text": (
                text_tower_flops(cfg, batch),
                lambda i=t_ids, m=t_mask: model.encode_text(i, m),
                lambda i=ids, m=mask: bundle.encode_tokens(i, m),
            ),
            "image": (
                image_tower_flops(cfg, batch),
                lambda p=t_pixels: model.encode_image(p),
                lambda p=pixels: bundle.encode_images(p),
            ),
        }
        for tower, (flops, torch_fn, ort_fn) in per_tower.items():
            if max_gflop is not None and flops / 1e9 > max_gflop:
                skipped.append(
                    {"size": size, "tower": tower, "batch": batch, "gflop": flops / 1e9, "why": "over --quick budget"}
                )
                continue
            counted = counted_flops(torch_fn) if batch == batches[0] else None
            for runtime, fn in (("torch", torch_fn), ("onnxruntime", ort_fn)):
                key = f"{size} {tower} {runtime} b{batch}"
                fns[key] = _no_grad(fn)
                row = {"size": size, "tower": tower, "runtime": runtime, "batch": batch, "flops": flops}
                if counted is not None:
                    row["flops_counted_at_batch"] = {"batch": batch, "flops": counted}
                rows.append(row | {"key": key})
    info = {
        "size": size,
        "config": {k: getattr(cfg, k) for k in ("hidden_size", "num_layers", "text_layers", "num_heads")}
        | {"intermediate_size": cfg.intermediate_size, "image_size": cfg.image_size, "patch_size": cfg.patch_size}
        | {"text_len": cfg.max_text_len, "image_tokens": cfg.num_patches + 1},
        "teacher_flops_per_request": teacher_flops(models.teacher.config, cfg.max_text_len, 1),
        "teacher_flops_counted": counted_flops(lambda: models.teacher.forward(*one)),
        "text_tower_flops_per_request": text_tower_flops(cfg, 1),
        "image_tower_flops_per_request": image_tower_flops(cfg, 1),
        "head_flops_per_request": head_flops(cfg, 1),
        "provider": bundle.provider,
    }
    return fns, rows, skipped, info


def _no_grad(fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        with torch.inference_mode():
            return fn()

    return run


def measure(args: argparse.Namespace, work: Path) -> dict:
    max_gflop = QUICK_MAX_GFLOP if args.quick else None
    fns: dict[str, Callable[[], object]] = matmul_fns(args.matmul_n, args.threads)
    rows: list[dict] = []
    skipped: list[dict] = []
    sizes: dict[str, dict] = {}
    provider = "CPUExecutionProvider"
    for size in args.sizes:
        t0 = time.perf_counter()
        f, r, s, info = tower_fns(size, args.batches, work, args.threads, max_gflop)
        fns |= f
        rows += r
        skipped += s
        sizes[size] = info
        provider = info["provider"]
        log.info("%s: models and bundles ready in %.1f s", size, time.perf_counter() - t0)
    rounds = args.rounds or (3 if args.quick else 7)
    samples = interleaved(fns, rounds, 0.05 if args.quick else 0.2, lambda m: log.info("flops %s", m))
    peak_flops = 2 * args.matmul_n**3
    # per round, the fastest library's matmul rate
    by_library = [samples[f"peak {lib}"] for lib in PEAK_LIBRARIES]
    per_round_peak = [peak_flops / min(ts) for ts in zip(*by_library, strict=True)]
    for row in rows:
        key = row.pop("key")
        achieved = [row["flops"] / t for t in samples[key]]
        row |= summary_ms(samples[key])
        row["achieved_gflops"] = statistics.median(achieved) / 1e9
        row["fraction_of_peak"] = statistics.median(a / p for a, p in zip(achieved, per_round_peak, strict=True))
    return {
        **header("flops", args.argv, quick=args.quick, threads=args.threads, provider=provider),
        "rounds": rounds,
        "peak": {
            "matmul_n": args.matmul_n,
            **{
                f"{lib}_gflops": statistics.median(peak_flops / t for t in samples[f"peak {lib}"]) / 1e9
                for lib in PEAK_LIBRARIES
            },
            "peak_gflops": statistics.median(per_round_peak) / 1e9,
            "definition": "per round, the fastest of torch, numpy and ONNX Runtime on an n x n fp32 matmul "
            "(2 n^3 FLOPs); fractions are per-round achieved / per-round peak, median over rounds",
        },
        "sizes": sizes,
        "rows": rows,
        "skipped": skipped,
    }


def markdown(report: dict) -> str:
    p = report["peak"]
    lines = [
        f"Matmul peak: **{p['peak_gflops']:.1f} GFLOP/s** (median over {report['rounds']} rounds; "
        + ", ".join(f"{lib} {p[lib + '_gflops']:.1f}" for lib in PEAK_LIBRARIES if lib + "_gflops" in p)
        + f", {p['matmul_n']}x{p['matmul_n']} fp32, "
        f"{report['machine']['threads_per_model_call']} thread(s)).",
        "",
        "| size | tower | runtime | batch | GFLOP/call | median ms | GFLOP/s | fraction of peak |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['size']} | {r['tower']} | {r['runtime']} | {r['batch']} | {r['flops'] / 1e9:.3f} | "
            f"{r['median_ms']:.2f} | {r['achieved_gflops']:.1f} | {r['fraction_of_peak']:.0%} |"
        )
    for s in report["skipped"]:
        lines.append(
            f"| {s['size']} | {s['tower']} | both | {s['batch']} | {s['gflop']:.1f} | not run: {s['why']} | | |"
        )
    lines += ["", "FLOPs per request (batch 1), analytic vs torch FlopCounterMode:", ""]
    lines += [
        "| size | teacher (fusion) | counted | text tower | image tower | head |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for size, s in report["sizes"].items():
        lines.append(
            f"| {size} | {s['teacher_flops_per_request'] / 1e9:.3f} G | {s['teacher_flops_counted'] / 1e9:.3f} G | "
            f"{s['text_tower_flops_per_request'] / 1e9:.3f} G | {s['image_tower_flops_per_request'] / 1e9:.3f} G | "
            f"{s['head_flops_per_request'] / 1e6:.2f} M |"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    labels = [
        f"{r['size']} {r['tower']}\n{'ORT' if r['runtime'] == 'onnxruntime' else 'torch'} b{r['batch']}" for r in rows
    ]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rows)), 4.0))
    colors = ["tab:blue" if r["tower"] == "text" else "tab:orange" for r in rows]
    ax.bar(range(len(rows)), [100 * r["fraction_of_peak"] for r in rows], color=colors)
    ax.axhline(60, color="black", linestyle="--", linewidth=1, label="target 60%")
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("% of measured matmul peak")
    ax.set_title(f"Achieved FLOP/s vs matmul peak {report['peak']['peak_gflops']:.1f} GFLOP/s")
    ax.legend()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"3 rounds; skip calls over {QUICK_MAX_GFLOP:g} GFLOP")
    add_model_grid_args(parser)
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3 quick, 7 full)")
    parser.add_argument("--threads", type=int, default=1, help="threads for torch, numpy and ONNX Runtime")
    parser.add_argument("--matmul-n", type=int, default=2048, help="side of the square matmul that measures peak")
    parser.add_argument("--work", type=Path, help="where bundles are built and reused (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for flops.json, .md and .png")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    set_threads(args.threads)
    ort.set_default_logger_severity(3)
    with tempfile.TemporaryDirectory(prefix="dide-bench-") as tmp:
        report = measure(args, args.work or Path(tmp))
    write_results(args.out, "flops", report, markdown, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
