"""Cache-build throughput in images/s: ONNX Runtime vs torch eager, batch 1 vs 32, small and ViLT-B/32-sized towers.

    python bench/cache_throughput.py [--quick]

Writes bench/results/cache_throughput.json and .md. Weights are random (throughput does not depend on
them). Two measurements per size: the image tower alone on preprocessed pixels (torch eager vs the
exported ONNX graph, batch 1 and 32), and the whole `dide-cache build` loop (read, sha256, decode,
ONNX Runtime, commit) over easy-VQA test images at batch 32.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import easy_vqa
import numpy as np
import onnxruntime as ort
import torch

from bench.models import write_bundle
from core.bundle import IMAGE_ENCODER
from core.preprocess import TextEncoder
from export.cache_cli import ImageItem, build
from export.onnx_export import export_image_graph
from export.runtime import Bundle
from export.store import EmbeddingStore
from training.student import DualEncoderStudent, StudentConfig
from training.tokenizer import train_wordpiece

log = logging.getLogger(__name__)

RESULTS = Path(__file__).resolve().parent / "results"
# Image-tower shapes; the text tower is kept minimal since the cache never runs it.
SIZES = {
    "small": {
        "image_size": 64,
        "patch_size": 8,
        "hidden_size": 256,
        "num_layers": 4,
        "num_heads": 4,
        "intermediate_size": 1024,
    },
    "base": {
        "image_size": 384,
        "patch_size": 32,
        "hidden_size": 768,
        "num_layers": 12,
        "num_heads": 12,
        "intermediate_size": 3072,
    },
}
BATCHES = (1, 32)


def make_student(size: str) -> DualEncoderStudent:
    torch.manual_seed(0)
    cfg = StudentConfig(task="vqa", num_labels=13, vocab_size=512, max_text_len=16, text_layers=1, **SIZES[size])
    return DualEncoderStudent(cfg).eval()


def images_per_s(
    run: Callable[[np.ndarray], object], pixels: np.ndarray, min_runs: int, min_seconds: float, warmup: int
) -> dict:
    """Time run(pixels) after a warm-up call on `warmup` images, for at least min_runs calls and min_seconds."""
    run(pixels[:warmup])
    runs, t0 = 0, time.perf_counter()
    while runs < min_runs or time.perf_counter() - t0 < min_seconds:
        run(pixels)
        runs += 1
    seconds = time.perf_counter() - t0
    return {"images_per_s": runs * len(pixels) / seconds, "ms_per_batch": 1000 * seconds / runs, "runs": runs}


def bench_tower(size: str, model: DualEncoderStudent, work: Path, quick: bool) -> list[dict]:
    """The image tower alone: torch eager vs ONNX Runtime (CPU), at each batch size."""
    S = model.config.image_size
    path = work / f"{size}-{IMAGE_ENCODER}"
    export_image_graph(model, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    rows = []
    for batch in BATCHES:
        pixels = rng.uniform(-1, 1, (batch, 3, S, S)).astype(np.float32)
        with torch.inference_mode():
            ref = model.encode_image(torch.from_numpy(pixels)).numpy()
        diff = float(np.abs(session.run(None, {"pixels": pixels})[0] - ref).max())
        min_runs = (3 if batch == 1 else 1) if quick else (20 if batch == 1 else 3)
        min_seconds = 0.0 if quick else 5.0

        def torch_run(x: np.ndarray) -> object:
            with torch.inference_mode():
                return model.encode_image(torch.from_numpy(x))

        for runtime, run in (("torch eager", torch_run), ("onnxruntime", lambda x: session.run(None, {"pixels": x}))):
            # A quick run warms up on 2 images: a full batch of the base tower takes minutes here.
            stats = images_per_s(run, pixels, min_runs, min_seconds, 2 if quick else batch)
            rows.append({"size": size, "runtime": runtime, "batch": batch, **stats, "max_abs_diff_vs_torch": diff})
            log.info("%s %-12s batch %2d: %8.1f images/s", size, runtime, batch, stats["images_per_s"])
    return rows


def bench_build(size: str, model: DualEncoderStudent, work: Path, n_images: int) -> dict:
    """The whole `dide-cache build` loop over easy-VQA test images, batch 32, into a fresh store."""
    cfg = model.config
    tokenizer = train_wordpiece(["what shape is in the image?", "what color is the shape?"], 100)
    text = TextEncoder(tokenizer, cfg.max_text_len)
    labels = [f"label{i}" for i in range(cfg.num_labels)]
    bundle_dir = write_bundle(model, work / f"{size}-bundle", text, labels, "fp32")
    bundle = Bundle.load(bundle_dir, ["CPUExecutionProvider"])
    paths = sorted(Path(p) for p in easy_vqa.get_test_image_paths().values())[:n_images]
    store = EmbeddingStore.open(work / f"{size}-store", bundle.model_id, bundle.dim, create=True)
    with store.writer("bench"):
        summary = build(bundle, store, [ImageItem(p, p.name) for p in paths], batch_size=32, progress=False)
    log.info("%s dide-cache build: %.1f images/s over %d images", size, summary.images_per_s, summary.encoded)
    return {
        "size": size,
        "runtime": "onnxruntime",
        "batch": 32,
        "images": summary.encoded,
        "seconds": summary.seconds,
        "images_per_s": summary.images_per_s,
    }


def machine() -> dict:
    cpu = platform.processor()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg(),
        "nice": os.nice(0),
    }


def write_markdown(report: dict, path: Path) -> None:
    m = report["machine"]
    lines = [
        "# Cache-build throughput",
        "",
        f"{report['date']} on {m['cpu']} ({m['cores']} cores, load average "
        f"{m['load_average_at_start'][0]:.1f} at start, nice {m['nice']}); "
        f"torch {report['versions']['torch']}, onnxruntime {report['versions']['onnxruntime']}.",
        f"Command: `{report['command']}`" + (" (quick: few runs, noisy)" if report["quick"] else ""),
        "",
        "Image tower alone, preprocessed pixels -> embeddings (images/s, higher is better):",
        "",
        "| size | batch | torch eager | onnxruntime | speed-up |",
        "| --- | --- | --- | --- | --- |",
    ]
    for size in SIZES:
        for batch in BATCHES:
            t, o = (
                next(r for r in report["tower"] if (r["size"], r["runtime"], r["batch"]) == (size, rt, batch))
                for rt in ("torch eager", "onnxruntime")
            )
            lines.append(
                f"| {size} | {batch} | {t['images_per_s']:.1f} | {o['images_per_s']:.1f} | "
                f"{o['images_per_s'] / t['images_per_s']:.2f}x |"
            )
    lines += ["", "Whole `dide-cache build` loop (read, sha256, decode, ONNX Runtime, commit), batch 32:", ""]
    lines += [f"- {b['size']}: {b['images_per_s']:.1f} images/s over {b['images']} images" for b in report["build"]]
    lines += ["", "Sizes: " + "; ".join(f"{k}: {v}" for k, v in SIZES.items()), ""]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few runs and images: a smoke run in a few minutes")
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES), help="sizes to measure")
    parser.add_argument("--out", type=Path, default=RESULTS / "cache_throughput.json", help="JSON results file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report = {
        "command": " ".join(["python", "bench/cache_throughput.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": args.quick,
        "machine": machine(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
            "numpy": np.__version__,
        },
        "sizes": {s: SIZES[s] for s in args.sizes},
        "tower": [],
        "build": [],
    }
    with tempfile.TemporaryDirectory(prefix="dide-bench-") as tmp:
        for size in args.sizes:
            model = make_student(size)
            report["tower"] += bench_tower(size, model, Path(tmp), args.quick)
            n_images = (64 if size == "base" else 256) if args.quick else (256 if size == "base" else 1000)
            report["build"].append(bench_build(size, model, Path(tmp), n_images))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if set(args.sizes) == set(SIZES):
        write_markdown(report, args.out.with_suffix(".md"))
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
