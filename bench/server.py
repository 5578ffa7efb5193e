"""The live-server harness of the benchmarks and tests: a real `dide-serve` (uvicorn) on 127.0.0.1, started,
waited for, measured (resident memory, Prometheus samples) and stopped."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
# What the `dide-serve` script runs (pyproject.toml [project.scripts]), whether or not the script is installed.
SERVE = "import sys; from service.app import main; sys.exit(main(sys.argv[1:]))"


def random_bundle(size: str, work: Path) -> Path:
    """A bundle to serve when none is given: the random-weight student of `size` (bench.models), under `work`."""
    from bench.models import build_models, write_bundle  # torch, only when there is no bundle to serve

    models = build_models(size)
    return write_bundle(models.student, work / size / "deep-fp32", models.text, models.labels, "fp32")


def server_env(bundles: list[Path], store: Path, **settings: object) -> dict[str, str]:
    """DIDE_* settings for a server: its bundles, its store, and e.g. batching=False as DIDE_BATCHING=false."""
    env = {"DIDE_BUNDLES": ",".join(str(b) for b in bundles), "DIDE_STORE": str(store)}
    for name, value in settings.items():
        env[f"DIDE_{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_bytes(pid: int, field: str) -> int:
    """A memory figure of a process from /proc/PID/status, in bytes: VmRSS (resident now), VmHWM (its peak)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for pid {pid}")


def rss_bytes(pid: int) -> int:
    """A process's resident set size, from /proc."""
    return proc_bytes(pid, "VmRSS")


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """CPU time (user + system) a process has used so far, every thread (or one: its main thread's id is the
    pid), from /proc."""
    with open(f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after "(name)", which may contain spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def sample(metrics: str, series: str) -> float:
    """One sample's value from Prometheus text, `series` written out with its labels (0 when absent)."""
    for line in metrics.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@dataclass
class LiveServer:
    url: str
    process: subprocess.Popen
    log: Path
    env: dict[str, str] = field(default_factory=dict)  # the DIDE_* settings it was started with
    command: list[str] = field(default_factory=list)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def rss_bytes(self) -> int:
        """The server process's resident set size, from /proc."""
        return rss_bytes(self.process.pid)


def start_server(env: dict[str, str], log: Path) -> LiveServer:
    """Run what `dide-serve` runs on a free 127.0.0.1 port with `env` over this process's environment,
    output to `log` (a file: a full pipe never blocks it)."""
    port = free_port()
    command = [sys.executable, "-c", SERVE, "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=REPO, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)
    return LiveServer(f"http://127.0.0.1:{port}", process, log, dict(env), command)


def wait_ready(
    server: LiveServer, timeout: float = 120.0, check: Callable[[httpx.Response], None] | None = None
) -> list[object]:
    """Poll /readyz until it answers 200; what was seen on the way ("refused", then statuses).

    `check` is called on every answer that is not a 200 (to assert what a loading server says). Raises
    AssertionError, with the end of the server's log, if the server exits or is not ready in time.
    """
    deadline = time.monotonic() + timeout
    seen: list[object] = []
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(f"dide-serve exited with {server.process.returncode}:\n{server.log_text()[-3000:]}")
        try:
            r = httpx.get(f"{server.url}/readyz", timeout=5)
        except httpx.TransportError:
            seen.append("refused")  # not listening until the lifespan has loaded and warmed the models
        else:
            seen.append(r.status_code)
            if r.status_code == 200:
                return seen
            if check is not None:
                check(r)
        time.sleep(0.1)
    raise AssertionError(f"dide-serve not ready after {timeout:g} s: {seen[-5:]}\n{server.log_text()[-3000:]}")


@contextlib.contextmanager
def running_server(env: dict[str, str], log: Path, timeout: float = 120.0) -> Iterator[LiveServer]:
    """A started and ready server for the length of a `with` block, stopped after it."""
    server = start_server(env, log)
    try:
        wait_ready(server, timeout)
        yield server
    finally:
        stop_server(server)


def stop_server(server: LiveServer, timeout: float = 30.0) -> int:
    """SIGTERM (uvicorn shuts down gracefully), SIGKILL if it does not stop in time; the exit status."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            return server.process.wait(timeout)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
            raise
    return server.process.returncode
