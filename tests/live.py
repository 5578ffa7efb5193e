"""The tests' view of the live-server harness (bench/server.py): a real `dide-serve` process on 127.0.0.1, plus
what only the tests need (servers expected to refuse to start, metric sums, a store being built)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from bench.images import b64
from bench.images import random_png as png
from bench.server import REPO, LiveServer, rss_bytes, stop_server, wait_ready
from bench.server import start_server as start_live_server
from export.store import EmbeddingStore

__all__ = [
    "QUESTION",
    "REPO",
    "LiveServer",
    "b64",
    "metric_sum",
    "png",
    "rss_bytes",
    "run_until_exit",
    "start_server",
    "stop_server",
    "wait_for_rows",
    "wait_ready",
]

QUESTION = "what color is the shape?"


def start_server(env: dict[str, str], log: Path) -> LiveServer:
    """A live server with two worker threads unless `env` says otherwise."""
    return start_live_server({"DIDE_THREADS": "2", **env}, log)


def run_until_exit(env: dict[str, str], log: Path, timeout: float = 120.0) -> tuple[int, str]:
    """Start a server that is expected to refuse to start: its exit status and log."""
    server = start_server(env, log)
    try:
        rc = server.process.wait(timeout)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
        raise AssertionError(f"the server did not exit within {timeout:g} s:\n{server.log_text()[-3000:]}") from None
    return rc, server.log_text()


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of every sample of `name` in Prometheus text whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, value = line.rsplit(" ", 1)
        got_name, _, got_labels = series.partition("{")
        if got_name != name:
            continue
        pairs = dict(p.split("=", 1) for p in got_labels.rstrip("}").split(",") if "=" in p)
        if all(pairs.get(k) == f'"{v}"' for k, v in labels.items()):
            total += float(value)
    return total


def wait_for_rows(
    root: Path, mid: str, at_least: int, process: subprocess.Popen | None = None, timeout: float = 60
) -> EmbeddingStore:
    """The store a running `dide-cache build` writes, once it holds `at_least` committed rows (or `process` exited)."""
    deadline = time.monotonic() + timeout
    while not (root / mid / "manifest.json").is_file():
        assert time.monotonic() < deadline, "the build never created its store"
        time.sleep(0.005)
    store = EmbeddingStore.open(root, mid, None)
    while len(store) < at_least and (process is None or process.poll() is None):
        assert time.monotonic() < deadline, f"the build committed only {len(store)} of {at_least} rows"
        time.sleep(0.005)
        store.refresh()
    return store
