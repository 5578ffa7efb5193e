"""Soak: a real `dide-serve` (uvicorn) on 127.0.0.1 held at the saturation rate for 60 s; errors and RSS growth.

    python -m bench.soak [--rate R | --probe] [--duration 60] [--bundle DIR] [--size small] [--work DIR]

The rate defaults to the saturation rate bench/load.py measured (its `capacity.throughput_rps["batching
on"]`: completed requests/s through 32 connections, the service's configuration there: batching on, text
cache off), read from bench/results/load.json. When that file is missing (or with --probe), the fallback
measures it here, the same way, on the soak's own server: 5 s of arrivals far above capacity through 32
connections, the completed requests per second. The load is open-loop (bench.load.open_loop: requests sent
at their due times whatever the server does) over up to 1,024 connections, so a backlog reaches the server
(which sheds it) instead of waiting in the client: 90% questions about cached image ids and 10% distinct
base64 images (decoded, encoded and added to the store), with varied questions.

Pass: no error other than the service's deliberate 503s (queue full or past the request deadline), and
resident memory (VmRSS of the server process, sampled from /proc every 0.5 s) grows less than 10% from
the end of a 10 s warm-up to the end of the run. Results go to bench/results/reliability.json ("soak").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import easy_vqa
import httpx
import numpy as np

from bench.images import b64, distinct_pngs
from bench.load import CONCURRENT_CLIENTS
from bench.loadgen import RawClient, arrival_times, open_loop, summarize
from bench.measure import RESULTS, configure_logging, header
from bench.server import random_bundle, rss_bytes, running_server, sample, server_env
from core.atomic import write_file_atomic

log = logging.getLogger(__name__)

RELIABILITY = RESULTS / "reliability.json"
WARMUP_S = 10.0
PROBE_S = 5.0
PROBE_RATE = 1000.0
UPLOAD_SHARE = 0.1
RSS_TARGET = 0.10
DRAIN_S = 15.0
QUESTIONS = [
    f"{w} {c} {s}?"
    for w in ("is there a", "what is the", "where is the")
    for c in ("red", "blue", "green")
    for s in ("circle", "square", "triangle")
]


def record_reliability(section: str, data: dict, path: Path = RELIABILITY) -> None:
    """Merge `data` into `section` of the reliability results file (read, update, atomic replace, under a lock)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(path.parent, os.O_RDONLY)  # flock on the directory: no lock file left beside the results
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError):
            report = {}
        report.setdefault(section, {}).update(data, recorded=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        write_file_atomic(path, (json.dumps(report, indent=2, sort_keys=True) + "\n").encode())
    finally:
        os.close(lock)
    log.info("recorded %s in %s", section, path)


class RssSampler:
    """VmRSS of one process every `interval` seconds, on a thread, as (seconds since start, bytes)."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)
        self._t0 = time.monotonic()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, RuntimeError):
                self.samples.append((time.monotonic() - self._t0, rss_bytes(self.pid)))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def at(self, t: float) -> int:
        """The last sample taken at or before t seconds."""
        before = [b for s, b in self.samples if s <= t]
        return before[-1] if before else self.samples[0][1]


class Traffic:
    """Request bodies: questions about cached ids, and a share of distinct uploaded images."""

    def __init__(self, ids: list[str], base_png: bytes) -> None:
        self.ids = ids
        self.base_png = base_png
        self.uploaded = 0

    def bodies(self, n: int, seed: int) -> Callable[[int], bytes]:
        rng = np.random.default_rng(seed)
        upload = rng.random(n) < UPLOAD_SHARE
        images = iter(distinct_pngs(self.base_png, 1000 + self.uploaded, int(upload.sum())))
        self.uploaded += int(upload.sum())
        out = []
        for i in range(n):
            image = {"image": b64(next(images))} if upload[i] else {"image_id": self.ids[i % 32]}
            out.append(json.dumps({**image, "question": QUESTIONS[i % len(QUESTIONS)], "top_k": 3}).encode())
        return out.__getitem__


async def drive(
    url: str, traffic: Traffic, rate: float, duration_s: float, seed: int, drain_s: float, connections: int
) -> dict:
    times = arrival_times(rate, duration_s, 10**7, "poisson", seed)
    # RawClient resends a request once on an idle connection uvicorn closed (its 5 s keep-alive timeout).
    client = RawClient(url)
    try:
        outcomes, lags = await open_loop(
            client, "/vqa", traffic.bodies(len(times), seed), times, connections=connections, drain_s=drain_s
        )
    finally:
        await client.aclose()
    return summarize(outcomes, lags, duration_s)


async def probe_capacity(url: str, traffic: Traffic) -> float:
    """bench/load.py's capacity measure: completed req/s through 32 connections, offered far above capacity."""
    times = arrival_times(PROBE_RATE, PROBE_S, 10**6, "poisson", 1)
    ids = traffic.ids

    def body(i: int) -> bytes:
        return json.dumps({"image_id": ids[i % len(ids)], "question": QUESTIONS[i % len(QUESTIONS)]}).encode()

    client = RawClient(url)
    try:
        outcomes, lags = await open_loop(client, "/vqa", body, times, connections=CONCURRENT_CLIENTS, drain_s=0.0)
    finally:
        await client.aclose()
    return summarize(outcomes, lags, PROBE_S)["throughput_rps"]


def error_lines(log_text: str) -> list[str]:
    """Logged errors and the exception line of each traceback, distinct, to say what went wrong without the log."""
    lines = log_text.splitlines()
    found = [line.split(" ", 2)[-1] for line in lines if " ERROR " in line or " CRITICAL " in line]
    for i, line in enumerate(lines):
        if line.startswith("Traceback"):
            found += [x for x in lines[i + 1 :] if x and not x.startswith((" ", "Traceback", "During", "The above"))][
                :1
            ]
    return sorted(set(found))


def saturation_from_load(path: Path) -> float | None:
    try:
        return float(json.loads(path.read_text())["capacity"]["throughput_rps"]["batching on"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


async def soak(args: argparse.Namespace, bundle: Path, work: Path) -> dict:
    paths = sorted(easy_vqa.get_test_image_paths().values())[:32]
    # One `dide-serve` as bench/load.py runs it: batching on, text cache off.
    env = server_env([bundle], work / "store", batching=True, text_cache_size=0, log_level="WARNING")
    with running_server(env, work / "server.log", 300) as live:
        url, process = live.url, live.process
        async with httpx.AsyncClient(base_url=url, timeout=60.0) as client:
            ids = []
            for p in paths:
                r = await client.post("/images", json={"image": b64(Path(p).read_bytes())})
                r.raise_for_status()
                ids.append(r.json()["image_id"])
        traffic = Traffic(ids, Path(paths[0]).read_bytes())
        rate, source = args.rate, "--rate"
        if rate is None and not args.probe:
            rate = saturation_from_load(args.load_json)
            source = f"{args.load_json} capacity.throughput_rps['batching on']"
        if rate is None:
            rate = await probe_capacity(url, traffic)
            source = f"measured here: completed req/s through {CONCURRENT_CLIENTS} connections over {PROBE_S:g} s"
        log.info("soak at %.1f req/s (%s) for %g s after a %g s warm-up", rate, source, args.duration, WARMUP_S)
        with RssSampler(process.pid) as rss:
            warm = await drive(url, traffic, rate, WARMUP_S, 7, DRAIN_S, args.connections)
            t_start = rss.samples[-1][0]
            run = await drive(url, traffic, rate, args.duration, 8, DRAIN_S, args.connections)
            t_end = rss.samples[-1][0]
        provider = httpx.get(url + "/readyz", timeout=10.0).json()["provider"]
        after = httpx.get(url + "/metrics", timeout=10.0).text
        server_log = live.log_text()
        process_alive = process.poll() is None
    bucket = 'dide_request_duration_seconds_bucket{{endpoint="/vqa",le="{}",status_class="{}"}}'
    server_side = {  # the service's own latency histogram for /vqa over the whole run, warm-up included
        "2xx": sample(after, bucket.format("+Inf", "2xx")),
        "2xx_within_1s": sample(after, bucket.format("1.0", "2xx")),
        "2xx_within_2s": sample(after, bucket.format("2.0", "2xx")),
        "4xx": sample(after, bucket.format("+Inf", "4xx")),
        "5xx": sample(after, bucket.format("+Inf", "5xx")),
    }
    start_rss, end_rss = rss.at(t_start), rss.at(t_end)
    during = [b for s, b in rss.samples if t_start <= s <= t_end]
    half = t_start + (t_end - t_start) / 2
    second_half = [b for s, b in rss.samples if half <= s <= t_end]
    errors = {k: v for k, v in run["errors"].items() if k != "503"}
    growth = (end_rss - start_rss) / start_rss
    return {
        "provider": provider,
        "rate_rps": rate,
        "rate_source": source,
        "duration_s": args.duration,
        "warmup_s": WARMUP_S,
        "connections": args.connections,
        "traffic": f"open-loop Poisson; {int(100 * (1 - UPLOAD_SHARE))}% cached image ids, "
        f"{int(100 * UPLOAD_SHARE)}% distinct base64 images; {len(QUESTIONS)} questions; text cache off",
        "requests": run["requests"],
        "ok": run["ok"],
        "deliberate_503": run["errors"].get("503", 0),
        "other_errors": errors,
        "throughput_rps": run["throughput_rps"],
        "p50_ms": run["p50_ms"],
        "p99_ms": run["p99_ms"],
        "max_ms": run["max_ms"],
        "warmup": {k: warm[k] for k in ("requests", "ok", "errors", "throughput_rps")},
        "rss_mib": {
            "after_warmup": start_rss / 2**20,
            "end": end_rss / 2**20,
            "max_during": max(during) / 2**20 if during else None,
            "median_second_half": statistics.median(second_half) / 2**20 if second_half else None,
            "samples": len(rss.samples),
        },
        "rss_growth_pct": 100 * growth,
        "server_side_vqa_responses": server_side,
        "server_tracebacks": server_log.count("Traceback"),
        "server_errors_logged": error_lines(server_log),
        "server_alive_at_end": process_alive,
        "pass": not errors and growth < RSS_TARGET and server_log.count("Traceback") == 0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, help="offered req/s (default: the saturation rate, see above)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of soak after the warm-up")
    parser.add_argument("--bundle", type=Path, help="serve this bundle instead of a random-weight one")
    parser.add_argument("--size", default="small", help="random-weight student size when no --bundle is given")
    parser.add_argument(
        "--connections",
        type=int,
        default=1024,
        help="most requests on the wire: above rate x the server's deadline, so every request reaches the server "
        "and a backlog is shed by the server (503), never left waiting in the client",
    )
    parser.add_argument(
        "--probe", action="store_true", help="measure the saturation rate here (load.py's way), not from load.json"
    )
    parser.add_argument("--load-json", type=Path, default=RESULTS / "load.json", help="bench/load.py's results")
    parser.add_argument("--work", type=Path, help="keep the bundle, store and server log here (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=RELIABILITY, help="the reliability results file to update")
    args = parser.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    configure_logging(quiet=("httpx",))
    with tempfile.TemporaryDirectory(prefix="dide-soak-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        bundle = args.bundle or random_bundle(args.size, work)
        result = asyncio.run(soak(args, bundle, work))
    report = {**header("soak", argv, quick=False, threads=None, provider=result["provider"]), **result}
    report["size"] = None if args.bundle else args.size
    record_reliability("soak", report, args.out)
    log.info(
        "soak: %d requests at %.1f/s, %d ok, %d deliberate 503, other errors %s; RSS %.1f -> %.1f MiB (%+.2f%%)",
        result["requests"],
        result["rate_rps"],
        result["ok"],
        result["deliberate_503"],
        result["other_errors"] or "none",
        result["rss_mib"]["after_warmup"],
        result["rss_mib"]["end"],
        result["rss_growth_pct"],
    )
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
