"""The service as users meet it: a real `dide-serve` (uvicorn) process on 127.0.0.1, spoken to over HTTP."""

from __future__ import annotations

import shutil
import signal
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from bench.server import LiveServer, sample, start_server, stop_server, wait_ready
from tests.live import QUESTION, b64, png

MAX_BODY = 1_000_000


def bomb() -> bytes:
    """A valid PNG header claiming 60000 x 60000 pixels, with almost no data behind it."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", 60_000, 60_000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def metric(client: httpx.Client, series: str) -> float:
    return sample(client.get("/metrics").text, series)


@pytest.fixture(scope="module")
def server(
    tiny_bundle_factory: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("http")
    env = {
        "DIDE_BUNDLES": f"{tiny_bundle_factory('vqa')},{tiny_bundle_factory('reasoning')}",
        "DIDE_STORE": str(tmp / "store"),
        "DIDE_MAX_BODY_BYTES": str(MAX_BODY),
        "DIDE_THREADS": "2",
    }
    srv = start_server(env, tmp / "server.log")
    try:
        yield srv
    finally:
        rc = stop_server(srv)
    log = srv.log.read_text()
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it so the exit status says why it stopped.
    assert rc in (0, -signal.SIGTERM) and "Application shutdown complete" in log, log[-3000:]
    assert "Traceback" not in log and " 500 " not in log, log[-3000:]


def loading(r: httpx.Response) -> None:
    """What /readyz may answer before it answers 200."""
    assert r.status_code == 503 and r.json()["code"] == "not_ready", r.text


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[httpx.Client]:
    wait_ready(server, check=loading)
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def test_readyz_waits_then_names_the_provider(server: LiveServer) -> None:
    seen = wait_ready(server, check=loading)
    assert seen[-1] == 200 and all(s in ("refused", 503) for s in seen[:-1])
    body = httpx.get(f"{server.url}/readyz").json()
    assert body["provider"] == "CPUExecutionProvider" and set(body["models"]) == {"vqa", "reasoning"}
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}


def test_vqa_with_base64_ids_and_multipart(client: httpx.Client) -> None:
    image = png(1)
    first = client.post("/vqa", json={"image": b64(image), "question": QUESTION, "top_k": 3})
    assert first.status_code == 200, first.text
    a = first.json()
    assert a["cached"] is False and len(a["answers"]) == 3
    b = client.post("/vqa", json={"image_id": a["image_id"], "question": QUESTION, "top_k": 3}).json()
    assert b["cached"] is True and b["answers"] == a["answers"]
    c = client.post(
        "/vqa", files={"image": ("x.png", image, "image/png")}, data={"question": QUESTION, "top_k": "3"}
    ).json()
    assert c["cached"] is True and c["answers"] == a["answers"]
    up = client.post("/images", files={"image": ("y.png", png(2), "image/png")}, data={"name": "http-2"}).json()
    assert client.get("/images/http-2").json()["image_id"] == up["image_id"]
    pair = client.post(
        "/reasoning", json={"images": [{"image_id": "http-2"}, {"image": b64(png(3))}], "statement": "two circles"}
    )
    assert pair.status_code == 200 and pair.json()["cached"] == [True, False]


def test_metrics_move_over_http(client: httpx.Client) -> None:
    count = 'dide_request_duration_seconds_count{endpoint="/vqa",status_class="2xx"}'
    misses = 'dide_cache_misses_total{cache="image"}'
    before, before_miss = metric(client, count), metric(client, misses)
    for i in range(3):
        assert client.post("/vqa", json={"image": b64(png(10 + i)), "question": QUESTION}).status_code == 200
    assert metric(client, count) == before + 3
    assert metric(client, misses) == before_miss + 3
    assert metric(client, "dide_ready") == 1
    assert metric(client, 'dide_batch_size_count{model="head"}') >= 3


def test_large_bodies_are_refused_with_413(client: httpx.Client) -> None:
    # 50 MB with a Content-Length: refused from the header, before the body is read.
    big = b'{"image": "' + b"A" * (50 * 1024 * 1024) + b'", "question": "q"}'
    r = client.post("/vqa", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["code"] == "payload_too_large"
    assert str(len(big)) in r.json()["message"]

    # 50 MB streamed (chunked, no Content-Length): refused once the bytes received pass the limit.
    def chunks() -> Iterator[bytes]:
        for _ in range(50):
            yield b" " * (1024 * 1024)

    r = client.post("/vqa", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["code"] == "payload_too_large"
    assert "at least" in r.json()["message"]
    # The server is unharmed and still answers.
    assert client.post("/vqa", json={"image": b64(png(20)), "question": QUESTION}).status_code == 200
    assert metric(client, 'dide_request_duration_seconds_count{endpoint="/vqa",status_class="4xx"}') >= 1


HOSTILE: list[tuple[str, dict]] = [
    ("wrong type", {"json": {"image_id": 7, "question": QUESTION}}),
    ("missing field", {"json": {"image": b64(png(4))}}),
    ("extra field", {"json": {"image": b64(png(4)), "question": QUESTION, "admin": True}}),
    ("garbage base64", {"json": {"image": "%%%%not-base64%%%%", "question": QUESTION}}),
    ("text file as image", {"json": {"image": b64(b"#!/bin/sh\necho hi\n"), "question": QUESTION}}),
    ("decompression bomb", {"json": {"image": b64(bomb()), "question": QUESTION}}),
    ("truncated image", {"json": {"image": b64(png(5)[:100]), "question": QUESTION}}),
    ("unknown id", {"json": {"image_id": "does-not-exist", "question": QUESTION}}),
    ("wrong content type", {"content": b"<xml/>", "headers": {"content-type": "application/xml"}}),
    (
        "non-UTF-8",
        {"content": b'{"image_id": "\xc3\x28", "question": "q"}', "headers": {"content-type": "application/json"}},
    ),
    (
        "deep nesting",
        {"content": b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "headers": {"content-type": "application/json"}},
    ),
    ("huge text", {"json": {"image_id": "x", "question": "why " * 50_000}}),
    ("empty body", {"content": b"", "headers": {"content-type": "application/json"}}),
    ("zero-byte upload", {"files": {"image": ("z.png", b"", "image/png")}, "data": {"question": QUESTION}}),
]


@pytest.mark.parametrize(("name", "kwargs"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_input_gets_a_json_4xx(client: httpx.Client, server: LiveServer, name: str, kwargs: dict) -> None:
    r = client.post("/vqa", **kwargs)
    assert 400 <= r.status_code < 500, (name, r.status_code, r.text[:300])
    assert set(r.json()) == {"code", "message"}
    assert server.process.poll() is None


def test_a_tampered_bundle_stops_startup_naming_the_file(
    tiny_bundle_factory: Callable[[str], Path], tmp_path: Path
) -> None:
    bad = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_factory("vqa"), bad)
    data = (bad / "text_encoder.onnx").read_bytes()
    (bad / "text_encoder.onnx").write_bytes(data[: len(data) // 2])  # truncated
    process = start_server({"DIDE_BUNDLES": str(bad), "DIDE_STORE": str(tmp_path / "store")}, tmp_path / "log").process
    rc = process.wait(120)
    log = (tmp_path / "log").read_text()
    assert rc != 0
    assert "text_encoder.onnx" in log and "sha256 does not match" in log
