"""API fuzzing: schemathesis against the live OpenAPI document of a real `dide-serve` on 127.0.0.1."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from bench.soak import record_reliability
from tests.live import LiveServer, b64, metric_sum, png, start_server, stop_server, wait_ready

API_KEY = "fuzz-key-0123456789"
MAX_EXAMPLES = 80  # per operation and phase: about 1,500 requests over the 8 operations
SEED = 20260
MIN_REQUESTS = 1000
RUN_TIMEOUT_S = 300  # a hard bound; the run takes about a minute on a busy 2-core machine

# Schema-valid is not always acceptable here: a base64 string the schema allows may not decode to an
# image, and that is a 422 by design (no JSON Schema can say "these bytes are a PNG"). Every other
# status for schema-valid data (415, 413, 400, 503, 5xx) still fails the positive_data_acceptance check.
CONFIG = """
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "401", "404", "409", "422"]
"""


@pytest.fixture(scope="module")
def fuzz_server(tiny_bundle_factory: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    tmp = tmp_path_factory.mktemp("fuzz")
    bundles = ",".join(str(tiny_bundle_factory(task)) for task in ("vqa", "entailment", "reasoning"))
    env = {
        "DIDE_BUNDLES": bundles,
        "DIDE_STORE": str(tmp / "store"),
        "DIDE_API_KEYS": API_KEY,
        "DIDE_MAX_BODY_BYTES": "1000000",
        "DIDE_MAX_TEXT_CHARS": "200",
    }
    server = start_server(env, tmp / "server.log")
    try:
        wait_ready(server)
        yield server, tmp
    finally:
        stop_server(server)


def seed_examples(server: LiveServer) -> None:
    """Store images under the ids the OpenAPI examples use, so the examples phase reaches the 200 paths."""
    headers = {"X-API-Key": API_KEY}
    for i, name in enumerate(("img_00042", "left_001", "catalogue-0042")):
        r = httpx.post(f"{server.url}/images", json={"image": b64(png(i)), "name": name}, headers=headers, timeout=30)
        assert r.status_code == 200, r.text


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_and_no_schema_violation(fuzz_server: tuple[LiveServer, Path]) -> None:
    server, tmp = fuzz_server
    seed_examples(server)
    before = httpx.get(f"{server.url}/metrics").text
    (tmp / "schemathesis.toml").write_text(CONFIG)
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",  # `st`, run by this interpreter: no dependence on PATH
        "--config-file",
        str(tmp / "schemathesis.toml"),
        "run",
        f"{server.url}/openapi.json",
        "--header",
        f"X-API-Key: {API_KEY}",
        "--checks",
        "all",
        "--phases",
        "examples,coverage,fuzzing,stateful",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        str(SEED),
        "--workers",
        "1",
        "--request-timeout",
        "30",
        "--generation-database",
        "none",
        "--report",
        "junit",
        "--report-dir",
        str(tmp / "report"),
        "--no-color",
    ]
    started = time.monotonic()
    run = subprocess.run(command, cwd=tmp, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=os.environ)
    seconds = time.monotonic() - started
    after = httpx.get(f"{server.url}/metrics").text
    output = run.stdout + run.stderr

    name = "dide_request_duration_seconds_count"
    requests = int(metric_sum(after, name) - metric_sum(before, name)) - 1  # less the /metrics call above
    server_errors = int(metric_sum(after, name, status_class="5xx"))
    cases = re.search(r"(\d+) generated", output)
    result = {
        "tool": f"schemathesis {schemathesis_version()}",
        "checks": "all (positive_data_acceptance also accepts 422: undecodable image bytes)",
        "phases": "examples, coverage, fuzzing, stateful",
        "max_examples_per_operation": MAX_EXAMPLES,
        "seed": SEED,
        "operations": 8,
        "test_cases": int(cases.group(1)) if cases else None,
        "requests": requests,
        "server_errors_5xx": server_errors,
        "responses_by_status_class": {
            c: int(metric_sum(after, name, status_class=c) - metric_sum(before, name, status_class=c))
            for c in ("2xx", "4xx", "5xx")
        },
        "failures": run.returncode != 0,
        "seconds": round(seconds, 1),
    }
    record_reliability("fuzz", result)
    print(f"schemathesis: {requests} requests in {seconds:.0f} s, {server_errors} server errors, exit {run.returncode}")
    assert run.returncode == 0, output[-6000:]
    assert server_errors == 0, output[-3000:]
    assert requests >= MIN_REQUESTS, result
    log = server.log_text()
    assert "Traceback" not in log, log[-3000:]


def schemathesis_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("schemathesis")
