"""A real `dide-serve` (uvicorn) process on 127.0.0.1 for the reliability tests: start, wait, measure, stop."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from export.store import EmbeddingStore

REPO = Path(__file__).resolve().parents[1]
SERVE = "import sys; from service.app import main; sys.exit(main(sys.argv[1:]))"
QUESTION = "what color is the shape?"


@dataclass
class LiveServer:
    url: str
    process: subprocess.Popen
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def rss_bytes(self) -> int:
        """The server process's resident set size, from /proc."""
        return rss_bytes(self.process.pid)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(env: dict[str, str], log: Path) -> LiveServer:
    """Run what `dide-serve` runs on a free 127.0.0.1 port, output to `log` (a file: a full pipe never blocks it)."""
    port = free_port()
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", SERVE, "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO,
            env={**os.environ, "DIDE_THREADS": "2", **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return LiveServer(f"http://127.0.0.1:{port}", process, log)


def wait_ready(server: LiveServer, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(f"dide-serve exited with {server.process.returncode}:\n{server.log_text()[-3000:]}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"dide-serve not ready after {timeout:g} s:\n{server.log_text()[-3000:]}")


def stop_server(server: LiveServer, timeout: float = 30.0) -> int:
    """SIGTERM (graceful), SIGKILL if it does not stop in time; the exit status."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            return server.process.wait(timeout)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
            raise
    return server.process.returncode


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


def png(seed: int, size: tuple[int, int] = (40, 40), mode: str = "RGB") -> bytes:
    """A random image of `size` (width, height) in `mode`, encoded as PNG."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


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
