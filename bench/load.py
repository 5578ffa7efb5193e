"""Service under load: an open-loop load generator against a real `dide-serve` (uvicorn) on 127.0.0.1.

    python -m bench.load [--quick] [--size small] [--bundle DIR] [--arrivals poisson|fixed]

The generator is OPEN-LOOP: request i is due at a time drawn in advance (Poisson arrivals, or a fixed
interval) and is sent then, whether or not earlier requests have been answered; its latency is counted
from the time it was due, so a slow server cannot slow the generator down and hide its own queueing
(no coordinated omission). Each run is bounded in duration and in request count. At most
`connections` requests are on the wire at once (like wrk2's connections); a due request that finds
them all busy waits in the client, and that wait is part of its latency.

Two servers run side by side, micro-batching on and off (DIDE_BATCHING), with the text-embedding
cache off (DIDE_TEXT_CACHE_SIZE=0, so every request runs the text tower), and are measured alternately
(A B A B ...):
1. HTTP+JSON overhead: one request at a time, POST /vqa with a cached image id, interleaved with the
   bare runtime call for the same request (tokenise, text tower, head via export.runtime.Bundle, in
   this process); overhead = service p50 - bare p50.
2. Throughput at 32 concurrent clients: arrivals far above capacity through 32 connections; completed
   requests per second, batching on vs off.
3. A sweep of arrival rates (fractions of the batching-on capacity), cached image ids vs uploaded
   base64 images (each upload a distinct image, so it is decoded and encoded): p50/p95/p99/max latency,
   throughput, error ratio, and the mean micro-batch size (from the server's /metrics).
Writes bench/results/load.json, load.md and load.png. The client shares the machine with the server.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import logging
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import easy_vqa
import httpx
import numpy as np
import uvloop
from PIL import Image

from bench.measure import RESULTS, header, percentile, write_json
from export.runtime import Bundle

log = logging.getLogger(__name__)

CONCURRENT_CLIENTS = 32
READY_TIMEOUT_S = 300.0
SATURATED_THROUGHPUT = 0.9  # a run is saturated below this fraction of its offered rate ...
SATURATED_ERRORS = 0.01  # ... or above this error ratio
PROBE_OVER_SEQUENTIAL = 8.0
QUESTIONS = ("what is the red shape?", "what color is the shape?", "is there a circle in the image?")


# --- the open-loop generator ----------------------------------------------------------------------------


def arrival_times(rate: float, duration_s: float, max_requests: int, kind: str, seed: int = 0) -> np.ndarray:
    """Seconds from the start at which requests are due: Poisson (exponential gaps) or fixed interval."""
    if rate <= 0 or duration_s <= 0 or max_requests < 1:
        raise ValueError("rate, duration_s and max_requests must be positive")
    n = min(max_requests, int(rate * duration_s * 1.5) + 16)
    if kind == "poisson":
        times = np.cumsum(np.random.default_rng(seed).exponential(1.0 / rate, n))
    elif kind == "fixed":
        times = np.arange(n) / rate
    else:
        raise ValueError(f"arrivals must be 'poisson' or 'fixed', got {kind!r}")
    return times[times < duration_s][:max_requests]


class RawClient:
    """A minimal HTTP/1.1 keep-alive client: pre-built request bytes, Content-Length responses, a connection pool
    that opens a connection whenever none is idle (callers bound concurrency, as open_loop's gate does).

    The load generator shares the 2 cores with the server, so its own cost per request is CPU taken from the
    server under test: httpx spends about 1-3 ms of Python per request here (measured: GET /healthz p50 1.2 ms
    through httpx vs 0.3 ms through a plain socket), which a compiled generator (wrk2, vegeta) does not.
    """

    def __init__(self, url: str, timeout_s: float = 30.0) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        self.timeout_s = timeout_s
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._open: set[asyncio.StreamWriter] = set()

    def _request(self, method: str, path: str, body: bytes) -> bytes:
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
        if body:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        return head.encode() + b"\r\n" + body

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._open.add(writer)
        return reader, writer

    async def _exchange(self, raw: bytes) -> int:
        reused = bool(self._idle)
        reader, writer = self._idle.pop() if reused else await self._connect()
        try:
            writer.write(raw)
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError) as e:
                if not reused or getattr(e, "partial", b""):
                    raise
                # The server closed this idle keep-alive connection (uvicorn: after 5 s) before our request
                # reached it: nothing was answered, so send it again on a new connection, as HTTP clients do.
                writer.close()
                self._open.discard(writer)
                reader, writer = await self._connect()
                writer.write(raw)
                head = await reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            status = int(lines[0].split(b" ", 2)[1])
            length = next(
                int(v) for k, _, v in (x.partition(b":") for x in lines[1:]) if k.lower() == b"content-length"
            )
            await reader.readexactly(length)
        except BaseException:
            writer.close()
            self._open.discard(writer)
            raise
        self._idle.append((reader, writer))
        return status

    async def request(self, method: str, path: str, body: bytes = b"") -> int:
        """The response's status; OSError / asyncio errors (TimeoutError, IncompleteReadError) propagate."""
        async with asyncio.timeout(self.timeout_s):
            return await self._exchange(self._request(method, path, body))

    async def aclose(self) -> None:
        for writer in self._open:
            writer.close()
        self._open.clear()
        self._idle.clear()


@dataclass
class Outcome:
    due: float  # seconds from the run's start
    sent: float = float("nan")  # when a connection took it (>= due)
    done: float = float("nan")
    status: int | str = "unfinished"  # HTTP status, an exception name, or "unfinished" (cut at the end)


async def open_loop(
    client: RawClient,
    path: str,
    body: Callable[[int], bytes],
    times: np.ndarray,
    *,
    connections: int,
    drain_s: float,
) -> tuple[list[Outcome], list[float]]:
    """Send request i (body(i)) at times[i] after the start, never waiting for earlier answers.

    Returns the outcomes and the dispatch lag of each request (how late the generator itself was).
    Requests still unanswered drain_s after the last one is due are cancelled ("unfinished").
    """
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(connections)
    outcomes = [Outcome(float(t)) for t in times]
    bodies = [body(i) for i in range(len(times))]  # built before the clock starts
    lags: list[float] = []

    async def fire(o: Outcome, data: bytes) -> None:
        async with gate:
            o.sent = loop.time() - start
            try:
                o.status = await client.request("POST", path, data)
            except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
                o.status = type(e).__name__
            o.done = loop.time() - start

    tasks = []
    start = loop.time()
    for o, data in zip(outcomes, bodies, strict=True):
        delay = start + o.due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        lags.append(loop.time() - start - o.due)
        tasks.append(asyncio.create_task(fire(o, data)))
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, start + float(times[-1]) + drain_s - loop.time()))
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return outcomes, lags


def summarize(outcomes: list[Outcome], lags: list[float], duration_s: float) -> dict:
    """Latency percentiles (ms, successful requests, counted from when each was due), throughput, errors."""
    ok, errors = [], {}
    for o in outcomes:
        if isinstance(o.status, int) and 200 <= o.status < 300:
            ok.append(o)
        else:
            errors[str(o.status)] = errors.get(str(o.status), 0) + 1
    latencies = [1000 * (o.done - o.due) for o in ok]
    last = max((o.done for o in ok), default=duration_s)
    n = len(outcomes)
    return {
        "requests": n,
        "offered_rps": n / duration_s,
        "ok": len(ok),
        "throughput_rps": len(ok) / max(last, 1e-9),
        "error_ratio": (n - len(ok)) / n if n else 0.0,
        "errors": errors,
        "p50_ms": percentile(latencies, 50),
        "p95_ms": percentile(latencies, 95),
        "p99_ms": percentile(latencies, 99),
        "max_ms": max(latencies, default=float("nan")),
        "client_wait_p50_ms": percentile([1000 * (o.sent - o.due) for o in ok], 50),
        "generator_lag_p99_ms": percentile([1000 * x for x in lags], 99),
    }


# --- the server -----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(port: int) -> list[str]:
    script = Path(sys.executable).with_name("dide-serve")
    if script.is_file():
        return [str(script), "--host", "127.0.0.1", "--port", str(port)]
    return [sys.executable, "-m", "service.app", "--host", "127.0.0.1", "--port", str(port)]


@dataclass
class Server:
    name: str  # "batching on" | "batching off"
    url: str
    process: subprocess.Popen
    log_path: Path
    env: dict[str, str]
    command: list[str]


@contextlib.contextmanager
def servers(bundle: Path, work: Path, modes: dict[str, bool]) -> Iterator[dict[str, Server]]:
    """One `dide-serve` subprocess per mode (name -> batching on?), each with its own store; stopped on exit."""
    started: dict[str, Server] = {}
    try:
        for name, batching in modes.items():
            slug = name.replace(" ", "-")
            port = free_port()
            env = {
                "DIDE_BUNDLES": str(bundle),
                "DIDE_STORE": str(work / f"store-{slug}"),
                "DIDE_BATCHING": "true" if batching else "false",
                "DIDE_TEXT_CACHE_SIZE": "0",
                "DIDE_LOG_LEVEL": "WARNING",
            }
            log_path = work / f"server-{slug}.log"
            command = serve_command(port)
            process = subprocess.Popen(
                command, env=os.environ | env, stdout=log_path.open("wb"), stderr=subprocess.STDOUT
            )
            started[name] = Server(name, f"http://127.0.0.1:{port}", process, log_path, env, command)
        for server in started.values():
            wait_ready(server)
        yield started
    finally:
        for server in started.values():
            stop(server.process)


def wait_ready(server: Server) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            tail = server.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"dide-serve ({server.name}) exited with {server.process.returncode}:\n{tail}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.url + "/readyz", timeout=2.0).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"dide-serve ({server.name}) not ready after {READY_TIMEOUT_S:g} s; see {server.log_path}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def head_batches(url: str) -> tuple[float, float]:
    """(sum, count) of the server's dide_batch_size histogram for the head (requests, model calls)."""
    text = httpx.get(url + "/metrics", timeout=10.0).text
    values = {}
    for part in ("sum", "count"):
        m = re.search(rf'^dide_batch_size_{part}\{{model="head"\}} (\S+)$', text, re.MULTILINE)
        values[part] = float(m.group(1)) if m else 0.0
    return values["sum"], values["count"]


# --- requests -------------------------------------------------------------------------------------------


def png_bytes(path: str | Path) -> bytes:
    return Path(path).read_bytes()


def distinct_pngs(base: bytes, first: int, n: int) -> list[bytes]:
    """n PNGs that differ from `base` (and from each other) in the first three pixels: each is new to the cache."""
    pixels = np.array(Image.open(io.BytesIO(base)).convert("RGB"))
    out = []
    for i in range(first, first + n):
        pixels[0, :3, 0] = [(i >> 16) & 255, (i >> 8) & 255, i & 255]
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


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
    capacity_repeats: int
    sweep_fractions: tuple[float, ...]
    sweep_repeats: int


# Sweep rates are fractions of the capacity at 32 connections (the better of on and off).
QUICK = Plan(3.0, 40, 20000, 2.0, 100, 2, (0.1, 0.5, 1.0, 2.0, 3.0), 1)
FULL = Plan(10.0, 300, 40000, 10.0, 500, 5, (0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0, 1.2, 1.5, 2.0, 3.0), 1)


class LoadBench:
    def __init__(self, args: argparse.Namespace, plan: Plan, bundle_dir: Path, servers: dict[str, Server]) -> None:
        self.args = args
        self.plan = plan
        self.servers = servers
        # One intra-op thread, so that no ONNX Runtime pool threads, which spin after each call, steal CPU
        # from the server under test between requests.
        self.bundle = Bundle.load(bundle_dir, threads=1)
        self.image_paths = sorted(easy_vqa.get_test_image_paths().values())[:32]
        self.upload_base = png_bytes(self.image_paths[0])
        self.uploaded = 0  # distinct images sent so far, over every run and server
        self.image_ids: dict[str, list[str]] = {}
        self.seed = 0

    async def setup(self) -> None:
        """Upload the cached images to every server (their embeddings go to its store)."""
        async with httpx.AsyncClient(timeout=60.0) as client:
            for name, server in self.servers.items():
                ids = []
                for path in self.image_paths:
                    data = base64.b64encode(png_bytes(path)).decode()
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
        return lambda i: vqa_body({"image": base64.b64encode(images[i]).decode()}, i)

    async def run(
        self, server: str, kind: str, rate: float, connections: int, duration_s: float, drain_s: float
    ) -> dict:
        self.seed += 1
        times = arrival_times(rate, duration_s, self.plan.max_requests, self.args.arrivals, self.seed)
        url = self.servers[server].url
        before = head_batches(url)
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
        after = head_batches(url)
        calls = after[1] - before[1]
        result = {
            "server": server,
            "images": kind,
            "rate_rps": rate,
            "connections": connections,
            "duration_s": duration_s,
            **summarize(outcomes, lags, duration_s),
            "mean_batch": (after[0] - before[0]) / calls if calls else float("nan"),
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
        vector = self.bundle.encode_images(self.bundle.preprocess_images([png_bytes(self.image_paths[0])]))

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


async def measure(args: argparse.Namespace, plan: Plan, bundle_dir: Path, work: Path) -> dict:
    modes = {"batching on": True, "batching off": False}
    with servers(bundle_dir, work, modes) as running:
        bench = LoadBench(args, plan, bundle_dir, running)
        await bench.setup()
        ready = httpx.get(next(iter(running.values())).url + "/readyz", timeout=10.0).json()
        overhead = await bench.overhead()
        log.info("HTTP+JSON overhead at p50: %s", overhead["overhead_p50_ms"])
        capacity = await bench.capacity(overhead["p50_ms"]["batching on"])
        log.info("capacity at %d connections: %s", CONCURRENT_CLIENTS, capacity["throughput_rps"])
        sweep = await bench.sweep(max(capacity["throughput_rps"].values()))
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
        "sweep": sweep,
    }


def markdown(report: dict) -> str:
    o, c = report["overhead"], report["capacity"]
    lines = [
        "The load generator is **open-loop**: " + report["generator"] + ".",
        "",
        f"HTTP+JSON overhead (one request at a time, {o['requests']} requests, cached image, text cache off): "
        + "; ".join(
            f"{name}: service p50 {o['p50_ms'][name]:.2f} ms - bare call p50 {o['p50_ms']['bare runtime call']:.2f} ms "
            f"= **{o['overhead_p50_ms'][name]:.2f} ms** "
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    parser.add_argument("--overhead-requests", type=int, help="requests in the overhead measurement")
    parser.add_argument("--work", type=Path, help="where bundles and stores go (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for load.json, .md and .png")
    args = parser.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    plan = QUICK if args.quick else FULL
    overrides = {
        "duration_s": args.duration,
        "sweep_fractions": tuple(args.fractions) if args.fractions else None,
        "overhead_requests": args.overhead_requests,
    }
    plan = Plan(**(plan.__dict__ | {k: v for k, v in overrides.items() if v is not None}))
    with tempfile.TemporaryDirectory(prefix="dide-bench-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        bundle_dir = args.bundle
        if bundle_dir is None:
            from bench.models import build_models, write_bundle

            models = build_models(args.size)
            bundle_dir = write_bundle(
                models.student, work / args.size / "deep-fp32", models.text, models.labels, "fp32"
            )
            del models
        with tempfile.TemporaryDirectory(prefix="load-", dir=work) as run_dir:
            body = uvloop.run(measure(args, plan, bundle_dir, Path(run_dir)))  # the generator costs less CPU
    report = {
        **header("load", argv, quick=args.quick, threads=None, provider=body["provider"] or "unknown"),
        "size": None if args.bundle else args.size,
        "bundle": str(args.bundle) if args.bundle else f"random-weight {args.size} student (bench.models)",
        **body,
    }
    write_json(args.out / "load.json", report)
    (args.out / "load.md").write_text(markdown(report))
    plot(report, args.out / "load.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
