"""Per-request latency: the fusion teacher vs the dual-encoder student (image cached or encoded), torch vs ONNX Runtime.

    python -m bench.latency [--quick] [--sizes small base] [--batches 1 32] [--threads 1]

The same request for every variant: one real easy-VQA question (6-14 tokens, padded to 16) and its
image, repeated to the batch size. Variants: the teacher's fusion forward (HF ViLT) in torch, and
exported as one graph (export.teacher_export) on ONNX Runtime fp32 and dynamic int8 (every weight MatMul and
the patch Conv); the student with the image embedding cached (text tower + head); the student encoding
the image in the request (image tower + text tower + head); the student with a shallower text tower (2
layers, image cached); each student in torch eager, ONNX Runtime fp32 and ONNX Runtime int8 (dynamic int8
text tower and head; the image tower stays fp32). On ONNX Runtime, teacher and deep student also run
with the padding trimmed to the question's own tokens, as the service does. Every speed-up is against
the teacher on the same runtime, precision and text length, so it measures the model, not the runtime.
Weights are random (from-scratch teachers of the named sizes), which does not change the timings.
Inputs start as token ids and preprocessed pixels, or the cached embedding: tokenising and decoding are
the same for every variant and left out. All variants of one size and batch are timed in interleaved
rounds; speed-ups are medians of per-round ratios. Writes bench/results/latency.json, latency.md and
latency.png.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from bench.flops import head_flops, image_tower_flops, teacher_flops, text_tower_flops
from bench.measure import (
    RESULTS,
    add_model_grid_args,
    header,
    interleaved,
    paired_ratio,
    save_figure,
    set_threads,
    summary_ms,
    write_results,
)
from bench.models import SHALLOW_TEXT_LAYERS, Models, Request, build_models, bundles, real_request, teacher_graphs
from export.runtime import Bundle

log = logging.getLogger(__name__)

TEACHER = "teacher fusion, torch"
TRIMMED = ", padding trimmed"  # the variants fed the question's own tokens instead of the padded length
# --quick skips calls over this: at base size, batch 32, the teacher and the image-in-request student
# (~800 GFLOP, minutes a call on a busy 2-core CPU) and the deep cached student (87 GFLOP).
QUICK_MAX_GFLOP = 50.0
QUICK_BUDGET_S = 45.0  # --quick: rounds per (size, batch) cut to fit this, but never below 3
FULL_BUDGET_S = 600.0


@dataclass
class Variant:
    name: str
    model: str  # "teacher" | "student" | "shallow student"
    image: str  # "fused" (teacher) | "cached" | "encoded in request"
    runtime: str  # "torch" | "onnxruntime fp32" | "onnxruntime int8"
    flops: int
    fn: Callable[[], np.ndarray]  # -> logits (B, C)
    trimmed: bool = False  # fed the question's own tokens, not the padded length


@dataclass
class Setup:
    """What every variant of one model size answers with: its models, the request, and the exported graphs."""

    models: Models
    request: Request
    loaded: dict[tuple[str, str], Bundle]  # (student kind "deep" | "shallow", precision) -> bundle
    teachers: dict[str, ort.InferenceSession]  # precision -> the teacher as one ONNX graph


def teacher_reference(v: Variant, found: list[Variant]) -> Variant | None:
    """The teacher variant `v` is compared with: same runtime and precision, same text length."""
    same = [u for u in found if u.model == "teacher" and (u.runtime, u.trimmed) == (v.runtime, v.trimmed)]
    return same[0] if same else None


def teacher_variants(setup: Setup, batch: int) -> list[Variant]:
    """The fusion teacher in torch (padded text) and as one ONNX graph per precision (padded and trimmed)."""
    models, request = setup.models, setup.request
    ids, mask, pixels = request.batch(batch)
    t_ids, t_mask, t_pixels = torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(pixels)
    teacher, cfg, n = models.teacher, models.teacher.config, request.tokens
    out = [
        Variant(
            TEACHER,
            "teacher",
            "fused",
            "torch",
            teacher_flops(cfg, ids.shape[1], batch),
            lambda: teacher.forward(t_ids, t_mask, t_pixels).logits.numpy(),
        )
    ]

    def ort_teacher(session: ort.InferenceSession, tokens: int) -> Callable[[], np.ndarray]:
        feed = {"input_ids": ids[:, :tokens], "attention_mask": mask[:, :tokens], "pixel_values": pixels}
        return lambda: session.run(None, feed)[0]

    for trimmed in (False, True):
        tokens = n if trimmed else ids.shape[1]
        for precision, session in setup.teachers.items():
            name = f"teacher fusion, onnxruntime {precision}" + (TRIMMED if trimmed else "")
            flops = teacher_flops(cfg, tokens, batch)
            runtime = f"onnxruntime {precision}"
            out.append(Variant(name, "teacher", "fused", runtime, flops, ort_teacher(session, tokens), trimmed))
    return out


def variants(setup: Setup, batch: int) -> list[Variant]:
    """Every variant's closure over the same request at `batch`, with its FLOPs per call."""
    models, request, loaded = setup.models, setup.request, setup.loaded
    ids, mask, pixels = request.batch(batch)
    t_ids, t_mask, t_pixels = torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(pixels)
    deep, shallow = models.student, models.shallow
    cfg, scfg = deep.config, shallow.config
    with torch.inference_mode():
        t_image = deep.encode_image(t_pixels)  # both students share the teacher's image tower
    text_flops, head_f = text_tower_flops(cfg, batch), head_flops(cfg, batch)
    out = teacher_variants(setup, batch)

    def torch_cached(model) -> Callable[[], np.ndarray]:
        return lambda: model.head(model.encode_text(t_ids, t_mask), t_image).numpy()

    def torch_encoded(model) -> Callable[[], np.ndarray]:
        return lambda: model.head(model.encode_text(t_ids, t_mask), model.encode_image(t_pixels)).numpy()

    def ort_cached(b: Bundle, image: np.ndarray, tokens: int | None = None) -> Callable[[], np.ndarray]:
        i, m = (ids, mask) if tokens is None else (ids[:, :tokens], mask[:, :tokens])
        return lambda: b.head(b.encode_tokens(i, m), image)

    def ort_encoded(b: Bundle) -> Callable[[], np.ndarray]:
        return lambda: b.head(b.encode_tokens(ids, mask), b.encode_images(pixels))

    image = loaded["deep", "fp32"].encode_images(pixels)
    students = (
        ("student", deep, "deep", text_flops),
        (f"shallow student ({SHALLOW_TEXT_LAYERS} text layers)", shallow, "shallow", text_tower_flops(scfg, batch)),
    )
    for label, model, kind, t_flops in students:
        out.append(
            Variant(f"{label}, image cached, torch", label, "cached", "torch", t_flops + head_f, torch_cached(model))
        )
        for precision in ("fp32", "int8"):
            b = loaded[kind, precision]
            name = f"{label}, image cached, onnxruntime {precision}"
            out.append(
                Variant(name, label, "cached", f"onnxruntime {precision}", t_flops + head_f, ort_cached(b, image))
            )
        if kind == "deep":
            # The text graph takes any length up to max_text_len: padding cut to the request's real tokens.
            flops = text_tower_flops(cfg, batch, request.tokens) + head_f
            for precision in ("fp32", "int8"):
                name = f"{label}, image cached, onnxruntime {precision}{TRIMMED}"
                fn = ort_cached(loaded[kind, precision], image, request.tokens)
                out.append(Variant(name, label, "cached", f"onnxruntime {precision}", flops, fn, trimmed=True))
            full = image_tower_flops(cfg, batch) + t_flops + head_f
            out.append(
                Variant(
                    f"{label}, image in request, torch",
                    label,
                    "encoded in request",
                    "torch",
                    full,
                    torch_encoded(model),
                )
            )
            for precision in ("fp32", "int8"):
                name = f"{label}, image in request, onnxruntime {precision}"
                out.append(
                    Variant(
                        name,
                        label,
                        "encoded in request",
                        f"onnxruntime {precision}",
                        full,
                        ort_encoded(loaded[kind, precision]),
                    )
                )
    return out


def warm_up(found: list[Variant]) -> tuple[dict[str, float], dict[str, float]]:
    """One call of each variant: (seconds per variant, max |logit difference| from the same model in torch
    (teacher, or student of the same depth and image path), for each ONNX Runtime variant)."""
    logits, seconds = {}, {}
    with torch.inference_mode():
        for v in found:
            t0 = time.perf_counter()
            logits[v.name] = v.fn()
            seconds[v.name] = time.perf_counter() - t0
    diffs = {}
    for v in found:
        torch_ref = [u for u in found if (u.model, u.image, u.runtime) == (v.model, v.image, "torch")]
        if v.runtime != "torch" and torch_ref:  # (--max-gflop may have skipped the reference)
            diffs[v.name] = float(np.abs(logits[v.name] - logits[torch_ref[0].name]).max())
    return seconds, diffs


def measure_group(setup: Setup, batch: int, args: argparse.Namespace) -> dict:
    models = setup.models
    found = variants(setup, batch)
    limit = args.max_gflop if args.max_gflop is not None else QUICK_MAX_GFLOP if args.quick else None
    skipped = [v for v in found if limit is not None and v.flops / 1e9 > limit]
    found = [v for v in found if v not in skipped]
    single, diffs = warm_up(found)

    def timed(fn: Callable[[], np.ndarray]) -> Callable[[], object]:
        def run() -> object:
            with torch.inference_mode():
                return fn()

        return run

    fns = {v.name: timed(v.fn) for v in found}
    one_round = sum(single.values())
    wanted = args.rounds or (5 if args.quick else 11)
    budget = QUICK_BUDGET_S if args.quick else FULL_BUDGET_S
    rounds = max(3, min(wanted, int(budget // max(one_round, 1e-9))))
    log.info("%s batch %d: %d variants, ~%.1f s a round, %d rounds", models.size, batch, len(fns), one_round, rounds)
    target = 0.05 if args.quick else 0.2
    progress = lambda m: log.info("%s b%d %s", models.size, batch, m)  # noqa: E731
    samples = interleaved(fns, rounds, target, progress, single)
    rows = []
    for v in found:
        row = {
            "variant": v.name,
            "model": v.model,
            "image": v.image,
            "runtime": v.runtime,
            "gflop": v.flops / 1e9,
            **summary_ms(samples[v.name]),
            "per_example_ms": 1000 * float(np.median(samples[v.name])) / batch,
            "round_ms": [1000 * x for x in samples[v.name]],  # one per interleaved round: any pair's ratio
        }
        if v.name in diffs:
            row["max_abs_logit_diff_vs_torch"] = diffs[v.name]
        ref = teacher_reference(v, found)
        if ref is not None:
            row["teacher_reference"] = ref.name
            row["speedup_vs_teacher"] = paired_ratio(samples[ref.name], samples[v.name])
        rows.append(row)
    return {
        "size": models.size,
        "batch": batch,
        "rounds": rounds,
        "rows": rows,
        "skipped": [
            {"variant": v.name, "gflop": v.flops / 1e9, "why": f"over {limit:g} GFLOP a call"} for v in skipped
        ],
    }


def markdown(report: dict) -> str:
    r = report["request"]
    lines = [
        f'Request: "{r["question"]}" ({r["tokens"]} tokens, padded to {r["text_len"]}) about one easy-VQA image; '
        f"threads per call: {report['machine']['threads_per_model_call']}.",
        "",
    ]
    for g in report["groups"]:
        lines += [
            f"**{g['size']}, batch {g['batch']}** ({g['rounds']} interleaved rounds)",
            "",
            "| variant | GFLOP | median ms | per example ms | speed-up vs teacher (same runtime, precision, text) |",
            "| --- | --- | --- | --- | --- |",
        ]
        for row in g["rows"]:
            speed = f"{row['speedup_vs_teacher']:.1f}x" if "speedup_vs_teacher" in row else "–"
            cells = [row["variant"], f"{row['gflop']:.3f}", f"{row['median_ms']:.2f}", f"{row['per_example_ms']:.2f}"]
            lines.append("| " + " | ".join([*cells, speed]) + " |")
        for s in g["skipped"]:
            lines.append(f"| {s['variant']} | {s['gflop']:.1f} | not run: {s['why']} | | |")
        lines.append("")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    groups = report["groups"]
    cols = min(2, len(groups))
    n_rows = -(-len(groups) // cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(7.0 * cols, 4.6 * n_rows), squeeze=False)
    for ax in axes.flat[len(groups) :]:
        ax.set_visible(False)
    for ax, g in zip(axes.flat, groups, strict=False):
        rows = g["rows"]
        colors = [
            "tab:red" if r["model"] == "teacher" else "tab:green" if r["image"] == "cached" else "tab:blue"
            for r in rows
        ]
        ax.barh(range(len(rows)), [r["median_ms"] for r in rows], color=colors)
        for i, r in enumerate(rows):
            if "speedup_vs_teacher" in r:
                ax.annotate(f" {r['speedup_vs_teacher']:.1f}x", (r["median_ms"], i), va="center", fontsize=7)
        ax.set_yticks(range(len(rows)), [r["variant"] for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("median ms per call (log); labels: speed-up vs the teacher on the same runtime and precision")
        ax.set_title(f"{g['size']}, batch {g['batch']}", fontsize=10)
    save_figure(fig, path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"few rounds; skip calls over {QUICK_MAX_GFLOP:g} GFLOP")
    add_model_grid_args(parser)
    parser.add_argument(
        "--max-gflop", type=float, help=f"skip calls over this many GFLOP (default {QUICK_MAX_GFLOP:g} with --quick)"
    )
    parser.add_argument(
        "--rounds", type=int, help="interleaved rounds (default 5 quick, 11 full; cut to a time budget)"
    )
    parser.add_argument("--threads", type=int, default=1, help="threads for torch and ONNX Runtime per call")
    parser.add_argument("--work", type=Path, help="where bundles are built and reused (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for latency.json, .md and .png")
    args = parser.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    set_threads(args.threads)
    ort.set_default_logger_severity(3)
    groups = []
    request_info: dict = {}
    with tempfile.TemporaryDirectory(prefix="dide-bench-") as tmp:
        work = args.work or Path(tmp)
        for size in args.sizes:
            models = build_models(size)
            request = real_request(models.text, models.student.config.image_size)
            request_info = {
                "question": request.question,
                "tokens": request.tokens,
                "text_len": int(request.input_ids.shape[1]),
                "image": request.image.name,
            }
            loaded = {
                key: Bundle.load(d, ["CPUExecutionProvider"], threads=args.threads)
                for key, d in bundles(models, work).items()
            }
            options = ort.SessionOptions()
            options.intra_op_num_threads = args.threads
            teachers = {
                precision: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                for precision, path in teacher_graphs(models, work).items()
            }
            setup = Setup(models, request, loaded, teachers)
            for batch in args.batches:
                groups.append(measure_group(setup, batch, args))
            del models, loaded, teachers, setup
    report = {
        **header("latency", argv, quick=args.quick, threads=args.threads, provider="CPUExecutionProvider"),
        "request": request_info,
        "shallow_text_layers": SHALLOW_TEXT_LAYERS,
        "groups": groups,
    }
    write_results(args.out, "latency", report, markdown, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
