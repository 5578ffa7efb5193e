"""An open-loop HTTP load generator: arrival times drawn in advance, a minimal keep-alive client, and a summary.

OPEN-LOOP: request i is due at a time drawn in advance (Poisson arrivals, or a fixed interval) and is sent
then, whether or not earlier requests have been answered; its latency is counted from the time it was due,
so a slow server cannot slow the generator down and hide its own queueing (no coordinated omission). At
most `connections` requests are on the wire at once (like wrk2's connections); a due request that finds
them all busy waits in the client, and that wait is part of its latency.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from bench.measure import percentile


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
