"""How every benchmark measures and records: interleaved timing, medians, and the machine/version header."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import shlex
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from core.atomic import write_file_atomic

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

RESULTS = Path(__file__).resolve().parent / "results"


def markers(name: str) -> tuple[str, str]:
    """The README section a report named `name` owns: <!-- name:start --> ... <!-- name:end -->."""
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def replace_section(path: Path, body: str, name: str) -> bool:
    """Replace the text between `name`'s markers; False (nothing written) when the file has none."""
    start, end = markers(name)
    text = path.read_text()
    if start not in text or end not in text:
        return False
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{body}{end}{tail}")
    return True


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    """Versions of the libraries a benchmark may use (those not installed are left out)."""
    import importlib.metadata

    out = {"python": platform.python_version()}
    for dist in ("torch", "onnxruntime", "onnxruntime-gpu", "numpy", "transformers", "fastapi", "uvicorn", "httpx"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    return out


def header(benchmark: str, argv: list[str], *, quick: bool, threads: int | None, provider: str) -> dict:
    """What every result JSON starts with: the benchmark, exact command, date, machine and versions."""
    return {
        "benchmark": benchmark,
        "command": shlex.join(["python", "-m", f"bench.{benchmark}", *argv]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": quick,
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "threads_per_model_call": threads,
            "execution_provider": provider,
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "nice": os.nice(0),
        },
        "versions": versions(),
    }


def set_threads(threads: int) -> None:
    """One thread count for torch (intra-op) and numpy's BLAS, so matmul peak and towers run alike."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    threadpool_limits(threads)


def write_json(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(path, (json.dumps(report, indent=2) + "\n").encode())
    log.info("wrote %s", path)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def calls_per_sample(fn: Callable[[], object], target_s: float) -> int:
    """Run fn once (warm-up) and return how many back-to-back calls make a sample of about target_s."""
    t0 = time.perf_counter()
    fn()
    single = time.perf_counter() - t0
    return max(1, min(1000, round(target_s / max(single, 1e-6))))


def interleaved(
    fns: dict[str, Callable[[], object]],
    rounds: int,
    target_s: float,
    progress: Callable[[str], None] | None = None,
    single_s: dict[str, float] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each fn, measured in rounds A B C A B C ...: one sample per fn per round.

    Each sample is the mean over enough back-to-back calls to last about target_s (one call when a call
    is longer), so a slow machine moment hits every fn of a round alike; compare fns round by round.
    `single_s` (seconds of one warm-up call per fn, already made) saves the warm-up call each fn gets.
    """
    if single_s is None:
        inner = {name: calls_per_sample(fn, target_s) for name, fn in fns.items()}
    else:
        inner = {name: max(1, min(1000, round(target_s / max(single_s[name], 1e-6)))) for name in fns}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            samples[name].append((time.perf_counter() - t0) / inner[name])
        if progress is not None:
            progress(f"round {r + 1}/{rounds}")
    return samples


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of numerator[i] / denominator[i] (the two measured side by side in round i)."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def summary_ms(samples: list[float]) -> dict:
    """Median, min and max of per-call seconds, in milliseconds, and the number of samples."""
    return {
        "median_ms": 1000 * statistics.median(samples),
        "min_ms": 1000 * min(samples),
        "max_ms": 1000 * max(samples),
        "samples": len(samples),
    }


def configure_logging(quiet: tuple[str, ...] = ()) -> None:
    """INFO with times, for a benchmark's main(); the `quiet` loggers (e.g. httpx's per request) at WARNING."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in quiet:
        logging.getLogger(name).setLevel(logging.WARNING)


def add_model_grid_args(parser: argparse.ArgumentParser) -> None:
    """--sizes and --batches: the grid of models and batch sizes a per-call benchmark measures."""
    parser.add_argument("--sizes", nargs="+", default=["small", "base"], help="model sizes (training.teacher.SIZES)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32], help="batch sizes")


def save_figure(fig: Figure, path: Path, dpi: int = 110) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def write_results(
    out: Path, name: str, report: dict, markdown: Callable[[dict], str], plot: Callable[[dict, Path], None]
) -> None:
    """OUT/NAME.json, NAME.md (the markdown of the report) and NAME.png (its plot)."""
    write_json(out / f"{name}.json", report)
    (out / f"{name}.md").write_text(markdown(report))
    plot(report, out / f"{name}.png")
