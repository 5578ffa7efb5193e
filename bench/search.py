"""Collection search: latency vs collection size, images scanned per second, and the fusion teacher over every image.

    python -m bench.search [--quick] [--sizes mini base] [--rows 10000 100000 1000000] [--base-rows 10000 100000]

For each model size (random weights: timings do not depend on them), a store of synthetic image vectors
(uniform in [-1, 1], as the towers' tanh poolers give) is written once under --work; then one VQA query
(the text tower once, then `export.search.scan` over the first N rows, memory-mapped) is timed at each
collection size N, after the image parts of those rows are computed (timed on their own: once per row,
not per query). The teacher answers the same query by a full ViLT fusion forward per image: timed on
--teacher-images images in batches of 64 and scaled linearly to N (its cost is the same for every image).
FLOPs are counted as 2 per multiply-add (LayerNorm, GELU and the add left out, as bench.flops does); the
machine's matmul peak (numpy, every core) is measured in the same run. Writes bench/results/search.json,
search.md and search.png.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from bench.flops import teacher_flops, text_tower_flops
from bench.measure import RESULTS, configure_logging, header, save_figure, write_results
from bench.models import MAX_TEXT_LEN, tokenizer_and_labels
from export.search import ImageParts, SearchHead, scan
from export.search_export import export_search_files, fusion_arrays
from export.store import EmbeddingStore
from training.teacher import build_teacher, student_from_teacher

log = logging.getLogger(__name__)

QUESTION = "is there a red circle in the image?"
ANSWER = "yes"
K = 10
TEACHER_BATCH = 64
TARGET_1M_S = 2.0  # 1M images at the demo size
TARGET_RATIO = 1000.0  # over the teacher at 10k images


def scan_flops(dim: int, rows: int = 1) -> int:
    """Per image: the second fusion layer (2D -> D), the classifier's first layer (D -> 2D), R head rows."""
    return 2 * (2 * dim * dim) + 2 * (dim * 2 * dim) + 2 * (2 * dim * rows)


def matmul_peak(threads: int, n: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of an n x n fp32 numpy matmul on `threads` threads, best of reps."""
    from threadpoolctl import threadpool_limits

    a = np.random.default_rng(0).random((n, n), np.float32)
    best = float("inf")
    with threadpool_limits(threads):
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ a
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def synthetic_store(root: Path, dim: int, rows: int, chunk: int = 100_000) -> EmbeddingStore:
    """A store of `rows` synthetic vectors (reused when already there), keyed by the sha256 of the row number."""
    store = EmbeddingStore.open(root, f"bench-search-d{dim}", dim, create=True)
    rng = np.random.default_rng(len(store))
    while len(store) < rows:
        a, b = len(store), min(rows, len(store) + chunk)
        keys = [hashlib.sha256(i.to_bytes(8, "little")).hexdigest() for i in range(a, b)]
        store.add(keys, rng.uniform(-1, 1, (b - a, dim)).astype(np.float32))
        log.info("synthetic store d=%d: %d / %d rows", dim, len(store), rows)
    return store


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def measure_size(size: str, rows: list[int], args: argparse.Namespace, work: Path) -> dict:
    text, labels = tokenizer_and_labels()
    torch.manual_seed(0)
    teacher = build_teacher(size, "vqa", labels, text.tokenizer, "easy-vqa", dropout=0.0, max_text_len=MAX_TEXT_LEN)
    teacher.model.eval()
    student = student_from_teacher(teacher).eval()
    cfg = student.config
    D = cfg.hidden_size
    with tempfile.TemporaryDirectory() as tmp:
        export_search_files(student, Path(tmp))
        graph = (Path(tmp) / "scan.onnx").read_bytes()
    head = SearchHead("vqa", labels, fusion_arrays(student), graph, ["CPUExecutionProvider"], threads=args.threads)
    ids, mask = text([QUESTION])
    t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)
    torch.set_num_threads(1)  # one short text: a thread team only adds waiting on a shared machine
    with torch.inference_mode():
        text_s = statistics.median(timed(lambda: student.encode_text(t_ids, t_mask), 7)[2:])
        text_emb = student.encode_text(t_ids, t_mask)[0].numpy()
    torch.set_num_threads(args.threads)
    query = head.query(text_emb, ANSWER)

    # The teacher: a full fusion forward per image, on a sample, per image.
    n_teacher = args.teacher_images if size != "base" else max(4, args.teacher_images // 32)  # ~15 s an image
    b = min(TEACHER_BATCH, n_teacher)
    pixels = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (b, 3, cfg.image_size, cfg.image_size)))
    pixels = pixels.float()
    ids_b, mask_b = t_ids.repeat(b, 1), t_mask.repeat(b, 1)
    with torch.inference_mode():
        teacher.forward(ids_b, mask_b, pixels)  # warm-up
        batches = timed(lambda: teacher.forward(ids_b, mask_b, pixels), max(1, n_teacher // b))
    teacher_per_image = statistics.median(batches) / b
    log.info("%s: teacher %.2f ms per image (%d images)", size, 1e3 * teacher_per_image, b * len(batches))

    store = synthetic_store(work / "stores", D, max(rows))
    per_n = []
    for n in rows:
        parts = ImageParts(head)
        t0 = time.perf_counter()
        parts.catch_up(store.vectors[:n])
        parts_s = time.perf_counter() - t0
        reps = args.reps if n * scan_flops(D) < 2e11 else max(2, args.reps // 2)
        scan(head, parts, query, K)  # warm-up

        def one_query(parts: ImageParts = parts) -> None:
            scan(head, parts, head.query(text_emb, ANSWER), K)

        samples = timed(one_query, reps)
        scan_s = statistics.median(samples)
        total = text_s + scan_s
        teacher_s = n * teacher_per_image
        per_n.append(
            {
                "images": n,
                "image_parts_s": parts_s,
                "image_parts_bytes": parts.nbytes,
                "scan_median_s": scan_s,
                "scan_min_s": min(samples),
                "scan_max_s": max(samples),
                "samples": reps,
                "search_s": total,  # text tower once + the scan
                "images_per_s": n / scan_s,
                "gflops_per_s": n * scan_flops(D) / scan_s / 1e9,
                "teacher_s": teacher_s,
                "teacher_over_search": teacher_s / total,
                "teacher_over_search_flops": n
                * teacher_flops(teacher.config, MAX_TEXT_LEN, 1)
                / (n * scan_flops(D) + text_tower_flops(cfg, 1)),
            }
        )
        log.info("%s, %d images: search %.3f s (%.2f M images/s), teacher %.0f s, ratio %.0fx", size, n, total,
                 n / scan_s / 1e6, teacher_s, teacher_s / total)  # fmt: skip
    return {
        "size": size,
        "dim": D,
        "labels": len(labels),
        "head_rows_per_query": 1,
        "scan_flops_per_image": scan_flops(D),
        "whole_head_flops_per_image": scan_flops(D) + 2 * (2 * D) * (2 * D),
        "teacher_flops_per_image": teacher_flops(teacher.config, MAX_TEXT_LEN, 1),
        "text_tower_flops": text_tower_flops(cfg, 1),
        "text_tower_s": text_s,
        "teacher_s_per_image": teacher_per_image,
        "teacher_images_timed": b * len(batches),
        "image_part_bytes_per_image": head.part_bytes,
        "scan_workers": head.workers,
        "block_rows": head.block,
        "rows": per_n,
    }


def verdicts(report: dict) -> list[dict]:
    out = []
    for s in report["sizes"].values():
        by_n = {r["images"]: r for r in s["rows"]}
        if s["dim"] == 128 and 1_000_000 in by_n:
            v = by_n[1_000_000]["search_s"]
            out.append({"target": f"1M images at D=128 ({s['size']}) in <= {TARGET_1M_S:g} s", "value": f"{v:.2f} s",
                        "met": v <= TARGET_1M_S})  # fmt: skip
        if 10_000 in by_n:
            v = by_n[10_000]["teacher_over_search"]
            out.append({"target": f"teacher / search >= {TARGET_RATIO:,.0f}x at 10k images ({s['size']}, D={s['dim']})",
                        "value": f"{v:,.0f}x", "met": v >= TARGET_RATIO})  # fmt: skip
    return out


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# Collection search (`POST /search/*`, `dide-cache search`)",
        "",
        f"`{report['command']}` — {report['date']}, {m['cpu']} ({m['cores']} cores), load average at start "
        f"{m['load_average_at_start']}, nice {m['nice']}. Matmul peak measured in the same run: "
        f"**{report['peak_gflops']:.0f} GFLOP/s** (numpy, {m['cores']} threads).",
        "",
        "| size | D | images | image parts (once) | search (text + scan) | images/s | GFLOP/s (% of peak) "
        "| teacher over every image | teacher / search, measured (by FLOPs) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in report["sizes"].values():
        for r in s["rows"]:
            pct = 100 * r["gflops_per_s"] / report["peak_gflops"]
            parts = f"{r['image_parts_s']:.2f} s, {r['image_parts_bytes'] / 1e6:,.0f} MB"
            speed = f"{r['images_per_s'] / 1e6:.2f} M | {r['gflops_per_s']:.1f} ({pct:.0f}%)"
            ratio = f"**{r['teacher_over_search']:,.0f}x** ({r['teacher_over_search_flops']:,.0f}x)"
            lines.append(
                f"| {s['size']} | {s['dim']} | {r['images']:,} | {parts} | {1e3 * r['search_s']:,.1f} ms | {speed} "
                f"| {r['teacher_s']:,.1f} s | {ratio} |"
            )
    lines += ["", "Per image (2 FLOPs per multiply-add; LayerNorm, GELU and adds not counted):", ""]
    for s in report["sizes"].values():
        lines.append(
            f"- {s['size']} (D={s['dim']}): scan **{s['scan_flops_per_image']:,} FLOPs** (the whole head would be "
            f"{s['whole_head_flops_per_image']:,}: the image half of the first layer is precomputed, "
            f"{s['image_part_bytes_per_image']:,} bytes per image in memory); teacher "
            f"{s['teacher_flops_per_image']:,} FLOPs ({s['teacher_s_per_image'] * 1e3:.2f} ms per image, timed on "
            f"{s['teacher_images_timed']} images and scaled to N); text tower once {s['text_tower_s'] * 1e3:.1f} ms."
        )
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {v['target']} | {v['value']} | {'yes' if v['met'] else '**no**'} |" for v in report["verdicts"]]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in report["sizes"].values():
        n = [r["images"] for r in s["rows"]]
        (line,) = ax.loglog(n, [r["search_s"] for r in s["rows"]], "o-", label=f"search, {s['size']} (D={s['dim']})")
        ax.loglog(n, [r["teacher_s"] for r in s["rows"]], "x--", color=line.get_color(), label=f"teacher, {s['size']}")
    ax.axhline(TARGET_1M_S, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("images in the collection")
    ax.set_ylabel("seconds per query")
    ax.set_title("One question over a whole collection")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.search", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and teacher images")
    parser.add_argument("--sizes", nargs="+", default=["mini", "base"], help="model sizes (mini is the demo's)")
    parser.add_argument("--rows", nargs="+", type=int, default=[10_000, 100_000, 1_000_000], help="collection sizes")
    parser.add_argument("--base-rows", nargs="+", type=int, default=[10_000, 100_000],
                        help="sizes at base width (1M needs ~9 GB: 3 GB of vectors, 6 GB of image parts)")  # fmt: skip
    parser.add_argument("--reps", type=int, default=3, help="timed queries per collection size")
    parser.add_argument("--teacher-images", type=int, default=256, help="images the teacher is timed on")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="cores for the scan and the teacher")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "dide-bench-search",
                        help="where the synthetic stores are kept between runs")  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = parser.parse_args(argv)
    configure_logging()
    if args.quick:
        args.reps, args.teacher_images, args.sizes, args.rows = 2, 64, ["mini"], [10_000, 100_000]
    torch.set_num_threads(args.threads)
    report = header("search", argv if argv is not None else sys.argv[1:], quick=args.quick, threads=args.threads,
                    provider="CPUExecutionProvider")  # fmt: skip
    report["onnxruntime_providers"] = ort.get_available_providers()
    report["peak_gflops"] = matmul_peak(args.threads)
    report["sizes"] = {}
    for size in args.sizes:
        rows = args.base_rows if size == "base" else args.rows
        report["sizes"][size] = measure_size(size, rows, args, args.work)
    report["peak_gflops_after"] = matmul_peak(args.threads)
    report["verdicts"] = verdicts(report)
    write_results(args.out, "search", report, markdown, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
