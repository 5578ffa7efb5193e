"""The service in process: every endpoint and error path through TestClient, the batcher, and the settings."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import logging
import shutil
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from export.runtime import Bundle, BundleError
from export.store import EmbeddingStore
from service.app import create_app
from service.batcher import MicroBatcher, Overloaded
from service.engine import Engine
from service.settings import Settings, get_settings

TASKS = ("vqa", "entailment", "reasoning")
QUESTION = "what color is the shape?"


# --- helpers ---------------------------------------------------------------------------------------------


def png(seed: int, size: tuple[int, int] = (40, 48), mode: str = "RGB") -> bytes:
    """A random image of `size` (width, height), encoded as PNG."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with one tiny compressed row (a decompression bomb)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def expected_logits(bundle: Bundle, text: str, *images: bytes) -> np.ndarray:
    """What the bundle computes for one example, without the service in between."""
    text_emb = bundle.encode_texts([text])
    embs = [bundle.encode_images(bundle.preprocess_images([im])) for im in images]
    return bundle.head(text_emb, *embs)[0]


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - x.max())
    return e / e.sum()


def metric(client: TestClient | httpx.Client, name: str, **labels: str) -> float:
    """One sample's value from /metrics (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, value = line.rsplit(" ", 1)
        got_name, _, got_labels = series.partition("{")
        got = ",".join(sorted(got_labels.rstrip("}").split(","))) if got_labels else ""
        if got_name == name and got == want:
            return float(value)
    return 0.0


def assert_json_error(r: httpx.Response, status: int | None = None) -> dict:
    """A 4xx whose body is exactly {"code", "message"}."""
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    if status is not None:
        assert r.status_code == status, (r.status_code, r.text[:300])
    body = r.json()
    assert set(body) == {"code", "message"}, body
    assert body["code"] and body["message"]
    return body


def block_workers(engine: Engine, threads: int) -> threading.Event:
    """Occupy every worker thread until the returned event is set."""
    release = threading.Event()
    for _ in range(threads):
        engine.executor.submit(release.wait, 30)
    return release


async def in_lifespan(app: FastAPI, body: Callable[[httpx.AsyncClient], object]) -> object:
    """Run `body(client)` against the app, lifespan included, with real concurrency (not TestClient)."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
            return await body(client)  # type: ignore[misc]


# --- fixtures --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundles(tiny_bundle_factory: Callable[[str], Path]) -> dict[str, Path]:
    return {task: tiny_bundle_factory(task) for task in TASKS}


@pytest.fixture(scope="module")
def loaded(bundles: dict[str, Path]) -> dict[str, Bundle]:
    return {task: Bundle.load(path) for task, path in bundles.items()}


@pytest.fixture
def make_settings(bundles: dict[str, Path], tmp_path: Path) -> Callable[..., Settings]:
    def make(tasks: tuple[str, ...] = TASKS, **overrides: object) -> Settings:
        values: dict[str, object] = {"bundles": [bundles[t] for t in tasks], "store": tmp_path / "store"}
        values.update(overrides)
        return Settings(**values)  # type: ignore[arg-type]

    return make


@pytest.fixture(scope="module")
def client(bundles: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """One app with all three tasks, shared by the tests that do not change settings."""
    settings = Settings(bundles=list(bundles.values()), store=tmp_path_factory.mktemp("store"), max_text_chars=100)
    with TestClient(create_app(settings)) as c:
        yield c


# --- probes and readiness --------------------------------------------------------------------------------


def test_readyz_is_503_json_until_the_lifespan_has_loaded_and_warmed(make_settings: Callable[..., Settings]) -> None:
    app = create_app(make_settings())
    c = TestClient(app)  # no `with`: the lifespan has not run
    assert c.get("/healthz").json() == {"status": "ok"}
    r = c.get("/readyz")
    assert r.status_code == 503
    assert r.json()["code"] == "not_ready" and set(r.json()) == {"code", "message"}
    assert r.headers["retry-after"] == "1"
    r = c.post("/vqa", json={"image_id": "x", "question": QUESTION})
    assert r.status_code == 503 and r.json()["code"] == "not_ready" and "retry-after" in r.headers
    assert metric(c, "dide_ready") == 0
    with c:
        r = c.get("/readyz")
        assert r.status_code == 200
        ready = r.json()
        assert ready["status"] == "ready" and ready["provider"] == "CPUExecutionProvider"
        assert set(ready["models"]) == set(TASKS)
        assert ready["models"]["vqa"]["labels"] == 13 and ready["models"]["vqa"]["dim"] == 32
        assert metric(c, "dide_ready") == 1
    assert app.state.engine.ready is False  # shut down: not ready again


# --- the four model endpoints ----------------------------------------------------------------------------


def test_vqa_by_bytes_then_by_id_matches_the_bundle(client: TestClient, loaded: dict[str, Bundle]) -> None:
    image = png(1)
    r = client.post("/vqa", json={"image": b64(image), "question": QUESTION, "top_k": 3})
    assert r.status_code == 200, r.text
    first = r.json()
    assert first["cached"] is False and len(first["answers"]) == 3
    bundle = loaded["vqa"]
    logits = expected_logits(bundle, QUESTION, image)
    order = np.argsort(-logits, kind="stable")[:3]
    assert [a["answer"] for a in first["answers"]] == [bundle.labels[i] for i in order]
    np.testing.assert_allclose([a["score"] for a in first["answers"]], sigmoid(logits)[order], atol=1e-5)
    assert first["model_id"] == bundle.model_id
    assert first["image_id"] == hashlib.sha256(image).hexdigest()

    again = client.post("/vqa", json={"image_id": first["image_id"], "question": QUESTION, "top_k": 3}).json()
    assert again["cached"] is True and again["answers"] == first["answers"]
    same_bytes = client.post("/vqa", json={"image": b64(image), "question": QUESTION, "top_k": 3}).json()
    assert same_bytes["cached"] is True and same_bytes["answers"] == first["answers"]
    every = client.post("/vqa", json={"image_id": first["image_id"], "question": QUESTION, "top_k": 100}).json()
    assert len(every["answers"]) == 13  # capped at the label count
    default = client.post("/vqa", json={"image_id": first["image_id"], "question": QUESTION}).json()
    assert len(default["answers"]) == 5


def test_vqa_accepts_multipart_and_data_urls(client: TestClient) -> None:
    image = png(2)
    r = client.post("/vqa", files={"image": ("x.png", image, "image/png")}, data={"question": QUESTION, "top_k": "2"})
    assert r.status_code == 200, r.text
    up = r.json()
    assert up["cached"] is False and len(up["answers"]) == 2
    fields = {"image_id": (None, up["image_id"]), "question": (None, QUESTION), "top_k": (None, "2")}
    by_form_id = client.post("/vqa", files=fields).json()
    assert by_form_id["cached"] is True and by_form_id["answers"] == up["answers"]
    url = client.post("/vqa", json={"image": "data:image/png;base64," + b64(image), "question": QUESTION, "top_k": 2})
    assert url.json()["answers"] == up["answers"]


def test_entailment_scores_are_a_distribution_over_the_labels(client: TestClient, loaded: dict[str, Bundle]) -> None:
    image = png(3)
    r = client.post("/entailment", files={"image": ("p.png", image, "image/png")}, data={"hypothesis": "a red circle"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body["scores"]) == {"entailment", "neutral", "contradiction"}
    assert sum(body["scores"].values()) == pytest.approx(1.0, abs=1e-6)
    bundle = loaded["entailment"]
    probs = softmax(expected_logits(bundle, "a red circle", image))
    np.testing.assert_allclose([body["scores"][lbl] for lbl in bundle.labels], probs, atol=1e-5)
    assert body["label"] == bundle.labels[int(np.argmax(probs))]
    by_id = client.post("/entailment", json={"image_id": body["image_id"], "hypothesis": "a red circle"}).json()
    assert by_id["cached"] is True and by_id["scores"] == pytest.approx(body["scores"])


def test_reasoning_over_a_pair_of_ids_or_bytes(client: TestClient, loaded: dict[str, Bundle]) -> None:
    left, right = png(4), png(5)
    statement = "there are two circles"
    r = client.post(
        "/reasoning", json={"images": [{"image": b64(left)}, {"image": b64(right)}], "statement": statement}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["cached"] == [False, False] and len(body["image_ids"]) == 2
    bundle = loaded["reasoning"]
    probs = softmax(expected_logits(bundle, statement, left, right))
    i_true = bundle.labels.index("True")
    assert body["score"] == pytest.approx(probs[i_true], abs=1e-5)
    assert body["label"] is bool(np.argmax(probs) == i_true)
    ids = [{"image_id": i} for i in body["image_ids"]]
    again = client.post("/reasoning", json={"images": ids, "statement": statement}).json()
    assert again["cached"] == [True, True] and again["score"] == pytest.approx(body["score"])
    swapped = client.post("/reasoning", json={"images": ids[::-1], "statement": statement}).json()
    assert swapped["image_ids"] == body["image_ids"][::-1]  # order is kept: left, right


def test_images_upload_status_names_and_store(client: TestClient, loaded: dict[str, Bundle]) -> None:
    image = png(6)
    r = client.post("/images", json={"image": b64(image), "name": "catalogue-6"})
    assert r.status_code == 200, r.text
    up = r.json()
    model_ids = {b.model_id for b in loaded.values()}
    assert up["cached"] is False and set(up["model_ids"]) == model_ids
    assert client.post("/images", json={"image": b64(image)}).json()["cached"] is True
    for key in (up["image_id"], "catalogue-6"):
        status = client.get(f"/images/{key}").json()
        assert status == {
            "image_id": up["image_id"],
            "cached": True,
            "model_ids": status["model_ids"],
            "tasks": status["tasks"],
        }
        assert set(status["model_ids"]) == model_ids and set(status["tasks"]) == set(TASKS)
    # Committed to every model's store on disk, name included.
    engine: Engine = client.app.state.engine  # type: ignore[attr-defined]
    for model_id in model_ids:
        store = EmbeddingStore.open(engine.settings.store, model_id, 32)
        assert store.resolve("catalogue-6") == up["image_id"]
    r = client.post("/vqa", json={"image_id": "catalogue-6", "question": QUESTION}).json()
    assert r["cached"] is True and r["image_id"] == up["image_id"]
    # Multipart upload; a name is permanent.
    other = png(7)
    r = client.post("/images", files={"image": ("o.png", other, "image/png")}, data={"name": "catalogue-7"})
    assert r.status_code == 200, r.text
    taken = client.post("/images", json={"image": b64(png(8)), "name": "catalogue-6"})
    assert assert_json_error(taken, 409)["code"] == "name_taken"
    unknown = client.get(f"/images/{'ab' * 32}").json()
    assert unknown == {"image_id": "ab" * 32, "cached": False, "model_ids": [], "tasks": []}
    assert assert_json_error(client.get("/images/no-such-name"), 404)["code"] == "image_not_found"


def test_image_cached_for_one_model_is_unknown_to_another(client: TestClient) -> None:
    vqa = client.post("/vqa", json={"image": b64(png(9)), "question": QUESTION}).json()
    r = client.post("/entailment", json={"image_id": vqa["image_id"], "hypothesis": "a square"})
    assert assert_json_error(r, 404)["code"] == "image_not_found"


# --- metrics ---------------------------------------------------------------------------------------------


def test_metrics_move_with_requests(client: TestClient) -> None:
    def snapshot() -> dict[str, float]:
        return {
            "vqa_2xx": metric(client, "dide_request_duration_seconds_count", endpoint="/vqa", status_class="2xx"),
            "vqa_4xx": metric(client, "dide_request_duration_seconds_count", endpoint="/vqa", status_class="4xx"),
            "status": metric(
                client, "dide_request_duration_seconds_count", endpoint="/images/{image_id}", status_class="4xx"
            ),
            "other": metric(client, "dide_request_duration_seconds_count", endpoint="other", status_class="4xx"),
            "text_hit": metric(client, "dide_cache_hits_total", cache="text"),
            "text_miss": metric(client, "dide_cache_misses_total", cache="text"),
            "image_hit": metric(client, "dide_cache_hits_total", cache="image"),
            "image_miss": metric(client, "dide_cache_misses_total", cache="image"),
            "head": metric(client, "dide_batch_size_count", model="head"),
            "decode": metric(client, "dide_stage_duration_seconds_count", stage="decode"),
            "encode": metric(client, "dide_stage_duration_seconds_count", stage="image_encode"),
            "text_encode": metric(client, "dide_stage_duration_seconds_count", stage="text_encode"),
            "lookup": metric(client, "dide_stage_duration_seconds_count", stage="lookup"),
        }

    before = snapshot()
    question = "is there a metrics triangle?"
    sha = client.post("/vqa", json={"image": b64(png(10)), "question": question}).json()["image_id"]
    client.post("/vqa", json={"image_id": sha, "question": question})
    client.post("/vqa", json={"question": question})
    client.get("/images/unknown-name")
    client.get("/no/such/path")
    after = snapshot()
    delta = {k: after[k] - before[k] for k in before}
    assert delta["vqa_2xx"] == 2 and delta["vqa_4xx"] == 1
    assert delta["status"] == 1 and delta["other"] == 1  # route templates, not raw paths
    assert delta["text_miss"] == 1 and delta["text_hit"] == 1  # the repeated question hit the LRU
    assert delta["image_miss"] == 1 and delta["image_hit"] >= 1
    assert delta["head"] == 2 and delta["decode"] == 1 and delta["encode"] == 1 and delta["text_encode"] == 1
    assert delta["lookup"] >= 2
    text = client.get("/metrics").text
    assert "/no/such/path" not in text
    for name in ("dide_queue_depth", "dide_inflight_requests", "dide_ready", "dide_build_info"):
        assert f"\n{name}" in text
    assert 'dide_request_duration_seconds_bucket{endpoint="/vqa",le="0.0005",status_class="2xx"}' in text
    assert 'dide_batch_size_bucket{le="64.0",model="head"}' in text
    info = next(line for line in text.splitlines() if line.startswith("dide_build_info{"))
    assert 'provider="CPUExecutionProvider"' in info and "vqa=" in info and "onnxruntime=" in info


def test_each_app_has_its_own_registry(make_settings: Callable[..., Settings]) -> None:
    a, b = create_app(make_settings()), create_app(make_settings())
    assert a.state.metrics.registry is not b.state.metrics.registry


# --- error paths -----------------------------------------------------------------------------------------

IMG = b64(png(11))
DEEP = "[" * 5000 + "]" * 5000

# (method, path, kwargs for the client call, expected status)
BAD_REQUESTS: list[tuple[str, str, dict, int]] = [
    ("post", "/vqa", {"json": {"image_id": 123, "question": QUESTION}}, 422),
    ("post", "/vqa", {"json": {"image_id": "x", "question": 42}}, 422),
    ("post", "/vqa", {"json": {"image_id": "x", "question": QUESTION, "top_k": "5"}}, 422),
    ("post", "/vqa", {"json": {"image_id": "x", "question": QUESTION, "top_k": 0}}, 422),
    ("post", "/vqa", {"json": {"image_id": "x", "question": QUESTION, "top_k": 10**12}}, 422),
    ("post", "/vqa", {"json": {"image_id": "x", "question": QUESTION, "top_k": 2.5}}, 422),
    ("post", "/vqa", {"json": {"image_id": None, "question": QUESTION}}, 422),
    ("post", "/vqa", {"json": {"question": QUESTION}}, 422),
    ("post", "/vqa", {"json": {"image": IMG}}, 422),
    ("post", "/vqa", {"json": {"image": IMG, "image_id": "x", "question": QUESTION}}, 422),
    ("post", "/vqa", {"json": {"image": IMG, "question": QUESTION, "extra": 1}}, 422),
    ("post", "/vqa", {"json": {"image": IMG, "question": ""}}, 422),
    ("post", "/vqa", {"json": {"image": IMG, "question": " \t\n"}}, 422),
    ("post", "/vqa", {"json": {"image": IMG, "question": "x" * 101}}, 422),
    ("post", "/vqa", {"json": {"image": "!!!not base64!!!", "question": QUESTION}}, 422),
    ("post", "/vqa", {"json": {"image": "QUJD", "question": QUESTION}}, 422),  # "ABC": not an image
    ("post", "/vqa", {"json": {"image": "é" * 8, "question": QUESTION}}, 422),
    ("post", "/vqa", {"json": {"image": b64(b"hello, I am a text file\n"), "question": QUESTION}}, 422),
    ("post", "/vqa", {"json": {"image": b64(png(1)[:60]), "question": QUESTION}}, 422),  # truncated
    ("post", "/vqa", {"json": {"image": b64(png_header_only(100_000, 100_000)), "question": QUESTION}}, 422),
    ("post", "/vqa", {"json": {"image_id": "no-such-image", "question": QUESTION}}, 404),
    ("post", "/vqa", {"json": {"image_id": "x" * 300, "question": QUESTION}}, 422),
    ("post", "/vqa", {"json": [1, 2, 3]}, 422),
    ("post", "/vqa", {"json": "just a string"}, 422),
    ("post", "/vqa", {"json": None}, 422),
    ("post", "/vqa", {"content": b"", "headers": {"content-type": "application/json"}}, 422),
    ("post", "/vqa", {"content": b'{"question": "x", ', "headers": {"content-type": "application/json"}}, 422),
    (
        "post",
        "/vqa",
        {"content": b'{"image_id": "\xff\xfe", "question": "q"}', "headers": {"content-type": "application/json"}},
        422,
    ),
    (
        "post",
        "/vqa",
        {"content": b'{"image_id": "a", "question": "\\ud800"}', "headers": {"content-type": "application/json"}},
        422,
    ),
    (
        "post",
        "/vqa",
        {
            "content": ('{"image_id": "a", "question": "q", "x": ' + DEEP + "}").encode(),
            "headers": {"content-type": "application/json"},
        },
        422,
    ),
    (
        "post",
        "/vqa",
        {"content": b"question=hi", "headers": {"content-type": "application/x-www-form-urlencoded"}},
        415,
    ),
    ("post", "/vqa", {"content": b"hello", "headers": {"content-type": "text/plain"}}, 415),
    ("post", "/vqa", {"content": png(1), "headers": {"content-type": "image/png"}}, 415),
    (
        "post",
        "/vqa",
        {"content": b"--x\r\nbroken", "headers": {"content-type": "multipart/form-data; boundary=x"}},
        422,
    ),
    ("post", "/vqa", {"files": {"image": ("e.png", b"", "image/png")}, "data": {"question": QUESTION}}, 422),
    ("post", "/vqa", {"files": {"image": ("t.txt", b"plain text", "text/plain")}, "data": {"question": QUESTION}}, 422),
    (
        "post",
        "/vqa",
        {"files": {"image": ("x.png", png(1), "image/png")}, "data": {"question": QUESTION, "top_k": "many"}},
        422,
    ),
    (
        "post",
        "/vqa",
        {"files": {"image": ("x.png", png(1), "image/png")}, "data": {"question": QUESTION, "zzz": "1"}},
        422,
    ),
    ("post", "/vqa", {"files": {"image": ("x.png", png(1), "image/png")}}, 422),
    (
        "post",
        "/vqa",
        {
            "files": [("image", ("a.png", png(1), "image/png")), ("image", ("b.png", png(2), "image/png"))],
            "data": {"question": QUESTION},
        },
        422,
    ),
    ("post", "/entailment", {"json": {"image": IMG}}, 422),
    ("post", "/entailment", {"json": {"image": IMG, "question": QUESTION}}, 422),
    ("post", "/reasoning", {"json": {"images": [{"image": IMG}], "statement": "s"}}, 422),
    ("post", "/reasoning", {"json": {"images": [{"image": IMG}] * 3, "statement": "s"}}, 422),
    ("post", "/reasoning", {"json": {"images": [{"image": IMG}, {}], "statement": "s"}}, 422),
    ("post", "/reasoning", {"json": {"images": [IMG, IMG], "statement": "s"}}, 422),
    ("post", "/reasoning", {"json": {"images": [{"image": IMG}, {"image_id": "nope"}], "statement": "s"}}, 404),
    ("post", "/reasoning", {"files": {"image": ("x.png", png(1), "image/png")}, "data": {"statement": "s"}}, 415),
    ("post", "/images", {"json": {}}, 422),
    ("post", "/images", {"json": {"image": "***"}}, 422),
    ("post", "/images", {"json": {"image": IMG, "name": ""}}, 422),
    ("post", "/images", {"json": {"image": IMG, "name": "a/b"}}, 422),
    ("post", "/images", {"json": {"image_id": "abc"}}, 422),
    ("post", "/images", {"files": {"name": (None, "only-a-name")}}, 422),
    ("post", "/images", {"data": {"name": "only-a-name"}}, 415),
    ("get", "/images/" + "x" * 300, {}, 422),
    ("get", "/vqa", {}, 405),
    ("delete", "/images/abc", {}, 405),
    ("get", "/nope", {}, 404),
]


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status"),
    BAD_REQUESTS,
    ids=[f"{i}-{m}{p[:12]}-{s}" for i, (m, p, _, s) in enumerate(BAD_REQUESTS)],
)
def test_bad_input_gets_a_json_4xx(client: TestClient, method: str, path: str, kwargs: dict, status: int) -> None:
    assert_json_error(getattr(client, method)(path, **kwargs), status)


@pytest.mark.parametrize(
    "image",
    [
        pytest.param(png(12, mode="RGBA"), id="rgba"),
        pytest.param(png(13, mode="L"), id="grey"),
        pytest.param(png(14, size=(2000, 1)), id="extreme-aspect"),
        pytest.param(png(15, size=(1, 1)), id="one-pixel"),
    ],
)
def test_unusual_but_valid_images_are_answered(client: TestClient, image: bytes) -> None:
    r = client.post("/vqa", json={"image": b64(image), "question": QUESTION})
    assert r.status_code == 200, r.text


def test_cmyk_16bit_and_animated_images_are_answered(client: TestClient) -> None:
    rgb = Image.fromarray(np.random.default_rng(16).integers(0, 256, (30, 30, 3), dtype=np.uint8))
    cmyk = io.BytesIO()
    rgb.convert("CMYK").save(cmyk, "JPEG")
    deep = io.BytesIO()
    Image.fromarray(np.arange(900, dtype=np.uint16).reshape(30, 30) * 70).save(deep, "PNG")
    gif = io.BytesIO()
    rgb.save(gif, "GIF", save_all=True, append_images=[rgb.rotate(90)], duration=50, loop=0)
    for data in (cmyk.getvalue(), deep.getvalue(), gif.getvalue()):
        r = client.post("/vqa", json={"image": b64(data), "question": QUESTION})
        assert r.status_code == 200, r.text


def test_body_over_the_limit_is_413_declared_or_streamed(make_settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(make_settings(("vqa",), max_body_bytes=10_000))) as c:
        big = {"image": b64(png(17, size=(200, 200))), "question": QUESTION}
        assert assert_json_error(c.post("/vqa", json=big), 413)["code"] == "payload_too_large"

        def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer encoding
            for _ in range(5000):  # 5 MB if read to the end
                yield b" " * 1000

        r = c.post("/vqa", content=chunks(), headers={"content-type": "application/json"})
        assert assert_json_error(r, 413)["code"] == "payload_too_large"
        assert "at least" in r.json()["message"]
        small = c.post("/vqa", json={"image": b64(png(18)), "question": QUESTION})
        assert small.status_code == 200
        assert metric(c, "dide_request_duration_seconds_count", endpoint="/vqa", status_class="4xx") == 2


def test_api_keys_are_required_when_configured_and_never_logged(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = make_settings(("vqa",), api_keys="key-one-SECRET, key-two-SECRET")
    with TestClient(create_app(settings)) as c:
        body = {"image": b64(png(19)), "question": QUESTION}
        assert assert_json_error(c.post("/vqa", json=body), 401)["code"] == "unauthorized"
        assert_json_error(c.post("/vqa", json=body, headers={"X-API-Key": "key-one-SECRE"}), 401)
        assert_json_error(c.post("/vqa", json=body, headers={"Authorization": "Bearer nope"}), 401)
        assert_json_error(c.post("/vqa", json=body, headers={"Authorization": "Basic a2V5LW9uZQ=="}), 401)
        assert_json_error(c.get("/images/abc", headers={"X-API-Key": "wrong"}), 401)
        assert_json_error(c.post("/images", json={"image": body["image"]}), 401)
        assert c.post("/vqa", json=body, headers={"X-API-Key": "key-two-SECRET"}).status_code == 200
        assert c.post("/vqa", json=body, headers={"Authorization": "Bearer key-one-SECRET"}).status_code == 200
        # Probes and scrapes stay open.
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        assert c.get("/metrics").status_code == 200
    assert "SECRET" not in caplog.text
    assert "SECRET" not in repr(settings) and "SECRET" not in str(settings.model_dump())


def test_cors_is_off_unless_configured(make_settings: Callable[..., Settings]) -> None:
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    with TestClient(create_app(make_settings(("vqa",)))) as c:
        r = c.options("/vqa", headers=preflight)
        assert "access-control-allow-origin" not in r.headers
        assert "access-control-allow-origin" not in c.get("/healthz", headers={"Origin": "https://app.example"}).headers
    with TestClient(create_app(make_settings(("vqa",), cors_origins="https://app.example"))) as c:
        r = c.options("/vqa", headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        other = c.options("/vqa", headers={**preflight, "Origin": "https://evil.example"})
        assert other.headers.get("access-control-allow-origin") != "https://evil.example"


def test_task_without_a_bundle_is_404(make_settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(make_settings(("vqa",)))) as c:
        r = c.post("/entailment", json={"image": b64(png(20)), "hypothesis": "a circle"})
        assert assert_json_error(r, 404)["code"] == "task_not_loaded"
        assert "vqa" in r.json()["message"]


def test_unexpected_errors_are_a_json_500_without_details(make_settings: Callable[..., Settings]) -> None:
    app = create_app(make_settings(("vqa",)))
    with TestClient(app, raise_server_exceptions=False) as c:
        model = app.state.engine.models["vqa"]

        def broken(*args: object) -> np.ndarray:
            raise RuntimeError("secret internals /etc/passwd")

        model.bundle.head = broken  # type: ignore[method-assign]
        r = c.post("/vqa", json={"image": b64(png(21)), "question": QUESTION})
        assert r.status_code == 500
        assert r.json() == {"code": "internal", "message": "internal error; it has been logged"}
        assert metric(c, "dide_request_duration_seconds_count", endpoint="/vqa", status_class="5xx") == 1


def test_startup_refuses_a_tampered_bundle_naming_the_file(bundles: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bundle"
    shutil.copytree(bundles["vqa"], bad)
    with open(bad / "head.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\0\0\0\0")
    with (
        pytest.raises(BundleError, match=r"head\.onnx"),
        TestClient(create_app(Settings(bundles=[bad], store=tmp_path))),
    ):
        pass


def test_startup_refuses_two_bundles_for_one_task(bundles: dict[str, Path], tmp_path: Path) -> None:
    settings = Settings(bundles=[bundles["vqa"], bundles["vqa"]], store=tmp_path)
    with pytest.raises(ValueError, match="one per task"), TestClient(create_app(settings)):
        pass
    with pytest.raises(ValueError, match="DIDE_BUNDLES"), TestClient(create_app(Settings(store=tmp_path))):
        pass


# --- concurrency: batching, overload, deadline, store lock -----------------------------------------------


def test_concurrent_requests_are_coalesced_and_answered_correctly(
    make_settings: Callable[..., Settings], loaded: dict[str, Bundle]
) -> None:
    app = create_app(make_settings(("vqa",), threads=1, batch_max=32))
    image = png(22)
    questions = [f"is there a shape number {i}?" for i in range(12)]

    async def body(client: httpx.AsyncClient) -> list[httpx.Response]:
        sha = (await client.post("/images", json={"image": b64(image)})).json()["image_id"]
        engine: Engine = app.state.engine
        release = block_workers(engine, 1)
        tasks = [asyncio.create_task(client.post("/vqa", json={"image_id": sha, "question": q})) for q in questions]
        batcher = engine.models["vqa"].batcher
        # The first batch is dispatched (and stuck behind the blocked worker); the rest queue behind it.
        last, stable_since = -1, time.monotonic()
        while time.monotonic() - stable_since < 0.3:
            if batcher.depth != last:
                last, stable_since = batcher.depth, time.monotonic()
            await asyncio.sleep(0.01)
        assert metric_value(app, "dide_queue_depth") == batcher.depth
        release.set()
        return list(await asyncio.gather(*tasks))

    responses = asyncio.run(in_lifespan(app, body))  # type: ignore[arg-type]
    bundle = loaded["vqa"]
    for q, r in zip(questions, responses, strict=True):
        assert r.status_code == 200, r.text
        top = r.json()["answers"][0]
        logits = expected_logits(bundle, q, image)
        assert top["answer"] == bundle.labels[int(np.argmax(logits))]
        assert top["score"] == pytest.approx(float(sigmoid(logits).max()), abs=1e-5)
    # Beyond the one warm-up row: 12 rows in at most 2 calls (the stuck batch, then all that queued behind it).
    assert metric_value(app, "dide_batch_size_sum", model="head") == len(questions) + 1
    assert metric_value(app, "dide_batch_size_count", model="head") in (1 + 1, 1 + 2)
    assert metric_value(app, "dide_queue_depth") == 0


def metric_value(app: FastAPI, name: str, **labels: str) -> float:
    return app.state.metrics.registry.get_sample_value(name, labels) or 0.0


def test_full_queue_answers_503_with_retry_after_and_recovers(make_settings: Callable[..., Settings]) -> None:
    app = create_app(make_settings(("vqa",), threads=1, batch_max=1, queue_max=2, retry_after_s=3))

    async def body(client: httpx.AsyncClient) -> tuple[list[httpx.Response], list[float], httpx.Response]:
        sha = (await client.post("/images", json={"image": b64(png(23))})).json()["image_id"]
        release = block_workers(app.state.engine, 1)
        start = time.perf_counter()
        times: list[float] = []

        async def one(i: int) -> httpx.Response:
            r = await client.post("/vqa", json={"image_id": sha, "question": f"question {i}"})
            times.append(time.perf_counter() - start)
            return r

        tasks = [asyncio.create_task(one(i)) for i in range(8)]
        await asyncio.sleep(0.5)
        release.set()
        responses = list(await asyncio.gather(*tasks))
        after = await client.post("/vqa", json={"image_id": sha, "question": "after the burst"})
        return responses, times, after

    responses, times, after = asyncio.run(in_lifespan(app, body))  # type: ignore[misc]
    shed = [r for r in responses if r.status_code == 503]
    served = [r for r in responses if r.status_code == 200]
    assert len(shed) + len(served) == len(responses)
    assert 1 <= len(served) <= 3 and len(shed) >= 5  # one running + at most queue_max waiting
    for r in shed:
        assert r.json()["code"] == "overloaded" and r.headers["retry-after"] == "3"
    assert sorted(times)[len(shed) - 1] < 0.5  # shed at once, not after the blockage cleared
    assert after.status_code == 200


def test_request_past_its_deadline_is_503(make_settings: Callable[..., Settings]) -> None:
    # inline_max_ms=0: the model call goes to the (blocked) worker threads, as a slow model's would.
    app = create_app(make_settings(("vqa",), threads=1, request_timeout_s=1.0, inline_max_ms=0))

    async def body(client: httpx.AsyncClient) -> tuple[httpx.Response, float, httpx.Response, httpx.Response]:
        first = await client.post("/vqa", json={"image": b64(png(24)), "question": QUESTION})
        sha = first.json()["image_id"]
        release = block_workers(app.state.engine, 1)
        start = time.perf_counter()
        late = await client.post("/vqa", json={"image_id": sha, "question": QUESTION})
        elapsed = time.perf_counter() - start
        probe = await client.get("/readyz")  # probes are not subject to the deadline, nor blocked
        release.set()
        after = await client.post("/vqa", json={"image_id": sha, "question": QUESTION})
        return late, elapsed, probe, after

    late, elapsed, probe, after = asyncio.run(in_lifespan(app, body))  # type: ignore[misc]
    assert late.status_code == 503 and late.json()["code"] == "deadline_exceeded" and "retry-after" in late.headers
    assert 0.95 < elapsed < 5.0
    assert probe.status_code == 200 and after.status_code == 200


def test_store_locked_by_a_build_keeps_new_vectors_in_memory(
    make_settings: Callable[..., Settings], loaded: dict[str, Bundle], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    settings = make_settings(("vqa",))
    model_id = loaded["vqa"].model_id
    image = png(25)
    with TestClient(create_app(settings)) as c:
        builder = EmbeddingStore.open(settings.store, model_id, 32)
        with builder.writer("test build"):
            r = c.post("/images", json={"image": b64(image), "name": "locked-1"})
            assert r.status_code == 200, r.text
            sha = r.json()["image_id"]
            assert "locked for writing" in caplog.text
            vqa = c.post("/vqa", json={"image_id": "locked-1", "question": QUESTION}).json()
            assert vqa["cached"] is True and vqa["image_id"] == sha  # served from the overlay
            assert c.get(f"/images/{sha}").json()["cached"] is True
            assert EmbeddingStore.open(settings.store, model_id, 32).resolve(sha) is None
        space = c.app.state.engine.spaces[model_id]  # type: ignore[attr-defined]
        deadline = time.monotonic() + 10
        while space.pending and time.monotonic() < deadline:  # the background flush commits it
            time.sleep(0.05)
        assert space.pending == 0
    store = EmbeddingStore.open(settings.store, model_id, 32)
    assert store.resolve(sha) == sha and store.resolve("locked-1") == sha
    assert store.verify()[0] == []


def test_a_store_that_cannot_be_written_keeps_serving_from_memory(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    with TestClient(create_app(make_settings(("vqa",)))) as c:
        space = next(iter(c.app.state.engine.spaces.values()))  # type: ignore[attr-defined]
        real_add = space.store.add

        def disk_full(*args: object, **kwargs: object) -> int:
            raise OSError(28, "No space left on device")

        space.store.add = disk_full
        shas = []
        for seed in (27, 28):
            r = c.post("/images", json={"image": b64(png(seed))})
            assert r.status_code == 200, r.text
            shas.append(r.json()["image_id"])
        assert caplog.text.count("No space left on device") == 1  # logged once, not per attempt
        assert all(c.get(f"/images/{sha}").json()["cached"] for sha in shas)
        space.store.add = real_add
        assert space.flush() is True
        assert all(space.store.resolve(sha) == sha for sha in shas)


def test_a_crashing_image_decoder_is_a_422_not_a_500(make_settings: Callable[..., Settings]) -> None:
    app = create_app(make_settings(("vqa",)))
    with TestClient(app) as c:
        bundle = app.state.engine.models["vqa"].bundle

        def crash(blobs: list[bytes]) -> np.ndarray:
            raise struct.error("unpack requires a buffer of 4 bytes")  # as some image plugins do

        bundle.preprocess_images = crash
        r = c.post("/vqa", json={"image": b64(png(29)), "question": QUESTION})
        assert assert_json_error(r, 422)["code"] == "invalid_image"


def test_model_calls_use_the_configured_onnx_runtime_threads(make_settings: Callable[..., Settings]) -> None:
    for threads in (1, 2):
        with TestClient(create_app(make_settings(("vqa",), intra_op_threads=threads))) as c:
            bundle = c.app.state.engine.models["vqa"].bundle  # type: ignore[attr-defined]
            assert bundle._text.get_session_options().intra_op_num_threads == threads


def test_unbatched_mode_serves_the_same_answers(make_settings: Callable[..., Settings]) -> None:
    image = b64(png(26))
    answers = []
    for batching in (True, False):
        with TestClient(create_app(make_settings(("vqa",), batching=batching))) as c:
            assert c.get("/readyz").json()["batching"] is batching
            answers.append(c.post("/vqa", json={"image": image, "question": QUESTION}).json()["answers"])
    assert answers[0] == answers[1]


# --- the micro-batcher on its own ------------------------------------------------------------------------


def run_batcher(
    body: Callable[[MicroBatcher[int, int]], object], fn: Callable[[list[int]], list[int]], **kwargs: object
) -> tuple[object, list[list[int]]]:
    calls: list[list[int]] = []

    def record(items: list[int]) -> list[int]:
        calls.append(list(items))
        return fn(items)

    async def main() -> object:
        with ThreadPoolExecutor(1) as pool:
            batcher: MicroBatcher[int, int] = MicroBatcher(record, pool, **kwargs)  # type: ignore[arg-type]
            batcher.start()
            try:
                return await body(batcher)  # type: ignore[misc]
            finally:
                await batcher.stop()

    return asyncio.run(main()), calls


def test_batcher_does_not_hold_a_lone_request_for_the_window() -> None:
    async def body(b: MicroBatcher[int, int]) -> float:
        start = time.perf_counter()
        assert await b.submit(3) == 6
        return time.perf_counter() - start

    elapsed, calls = run_batcher(body, lambda xs: [2 * x for x in xs], max_batch=8, wait_s=2.0, queue_max=8)
    assert calls == [[3]] and elapsed < 0.5  # type: ignore[operator]


def test_batcher_waits_for_requests_on_their_way_and_coalesces() -> None:
    async def body(b: MicroBatcher[int, int]) -> list[int]:
        async def late(x: int) -> int:
            with b.slot() as slot:
                await asyncio.sleep(0.05)  # e.g. decoding an image before it needs the model
                return await slot.submit(x)

        return list(await asyncio.gather(b.submit(1), late(2), late(3)))

    results, calls = run_batcher(body, lambda xs: [x * 10 for x in xs], max_batch=8, wait_s=1.0, queue_max=8)
    assert results == [10, 20, 30]
    assert calls == [[1, 2, 3]]


def test_batcher_bounds_the_batch_and_the_queue() -> None:
    gate = threading.Event()

    def slow(xs: list[int]) -> list[int]:
        gate.wait(10)
        return xs

    async def body(b: MicroBatcher[int, int]) -> tuple[list[object], int]:
        tasks = [asyncio.create_task(b.submit(0))]
        await asyncio.sleep(0.1)  # item 0 is dispatched, and its call blocks
        tasks += [asyncio.create_task(b.submit(i)) for i in range(1, 7)]
        await asyncio.sleep(0.1)
        depth = b.depth
        gate.set()
        return list(await asyncio.gather(*tasks, return_exceptions=True)), depth

    (results, depth), calls = run_batcher(body, slow, max_batch=2, wait_s=0.0, queue_max=4)
    overloaded = [r for r in results if isinstance(r, Overloaded)]
    assert depth == 4 and len(overloaded) == 2  # 1 running, 4 queued, 2 refused
    assert calls == [[0], [1, 2], [3, 4]]


def test_batcher_fails_only_the_item_whose_result_is_an_exception() -> None:
    def fn(xs: list[int]) -> list[object]:
        return [ValueError("bad item") if x < 0 else x for x in xs]

    async def body(b: MicroBatcher[int, int]) -> list[object]:
        with b.slot() as s1, b.slot() as s2:
            return list(await asyncio.gather(s1.submit(-1), s2.submit(5), return_exceptions=True))

    results, _ = run_batcher(body, fn, max_batch=8, wait_s=0.5, queue_max=8)  # type: ignore[arg-type]
    assert isinstance(results[0], ValueError) and results[1] == 5  # type: ignore[index]


def test_unbatched_mode_calls_one_item_at_a_time_and_still_bounds_pending() -> None:
    async def body(b: MicroBatcher[int, int]) -> list[int]:
        return list(await asyncio.gather(*(b.submit(i) for i in range(5))))

    results, calls = run_batcher(body, lambda xs: xs, max_batch=8, wait_s=0.5, queue_max=8, enabled=False)
    assert results == [0, 1, 2, 3, 4] and all(len(c) == 1 for c in calls)
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(lambda xs: xs, ThreadPoolExecutor(1), max_batch=0, wait_s=0.0, queue_max=1)


def test_a_lone_quick_item_runs_on_the_loop_and_a_slow_or_crowded_one_does_not() -> None:
    threads: list[str] = []

    def fn(xs: list[int]) -> list[int]:
        threads.append(threading.current_thread().name)
        if xs[0] >= 100:
            time.sleep(0.3)  # a slow model
        return [x + 1 for x in xs]

    async def body(b: MicroBatcher[int, int]) -> list[int]:
        async def late(x: int) -> int:
            with b.slot() as slot:
                await asyncio.sleep(0.05)
                return await slot.submit(x)

        first = await b.submit(1)  # how long a lone call takes is not known yet: the executor
        second = await b.submit(2)  # known to be quick, and alone: on the loop
        crowded = await asyncio.gather(late(3), late(4), b.submit(5))  # others on their way: coalesced
        slow = [await b.submit(100), await b.submit(101)]  # its last lone call took 300 ms > 100 ms
        return [first, second, *crowded, *slow]

    for enabled in (True, False):
        threads.clear()
        # 100 ms: a trivial call counts as quick even on a loaded machine (one took over 10 ms in a CI run)
        results, calls = run_batcher(body, fn, max_batch=8, wait_s=1.0, queue_max=8, inline_max_s=0.1, enabled=enabled)
        assert results == [2, 3, 4, 5, 6, 101, 102]
        loop_thread = threading.current_thread().name  # asyncio.run runs the loop in this thread
        if enabled:
            assert calls == [[1], [2], [5, 3, 4], [100], [101]]
            assert [t == loop_thread for t in threads] == [False, True, False, True, False]
        else:  # one at a time; a lone quick one on the loop, the rest in the executor
            assert calls == [[1], [2], [5], [3], [4], [100], [101]]
            assert [t == loop_thread for t in threads][:2] == [False, True] and threads[-1] != loop_thread


def test_a_lone_item_runs_on_the_loop_only_after_the_model_was_idle_for_a_call() -> None:
    threads: list[str] = []

    def fn(xs: list[int]) -> list[int]:
        threads.append(threading.current_thread().name)
        time.sleep(0.005)
        return xs

    async def body(b: MicroBatcher[int, int]) -> list[int]:
        out = [await b.submit(1)]  # unknown: the executor; a call takes 5 ms
        out.append(await b.submit(2))  # right after one finished (a busy server): the executor again
        await asyncio.sleep(0.05)  # idle for longer than a call
        out.append(await b.submit(3))  # on the loop
        return out

    for enabled in (True, False):
        threads.clear()
        results, _ = run_batcher(body, fn, max_batch=8, wait_s=0.0, queue_max=8, inline_max_s=1.0, enabled=enabled)
        assert results == [1, 2, 3]
        assert [t == threading.current_thread().name for t in threads] == [False, False, True]


def test_a_lone_item_does_not_run_on_the_loop_beside_a_batch_in_flight() -> None:
    gate = threading.Event()
    threads: list[str] = []

    def fn(xs: list[int]) -> list[int]:
        threads.append(threading.current_thread().name)
        if xs == [0]:
            gate.wait(10)
        return xs

    async def body(b: MicroBatcher[int, int]) -> list[int]:
        await b.submit(7)  # a lone call is known to be quick from here on
        with b.slot() as other:  # someone on the way: 0 goes through the queue, and its call blocks
            first = asyncio.create_task(b.submit(0))
            await asyncio.sleep(0.1)
            threading.Timer(0.1, gate.set).start()
            second = await other.submit(8)  # alone now, but the worker is busy: 8 waits for the next batch
        return [await first, second]

    results, calls = run_batcher(body, fn, max_batch=8, wait_s=0.0, queue_max=8, inline_max_s=1.0)
    assert results == [0, 8] and calls == [[7], [0], [8]]
    assert threading.current_thread().name not in threads


# --- settings and the OpenAPI document -------------------------------------------------------------------


def test_settings_read_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DIDE_BUNDLES", f"{tmp_path / 'a'}, {tmp_path / 'b'},")
    monkeypatch.setenv("DIDE_API_KEYS", "k1,k2")
    monkeypatch.setenv("DIDE_BATCHING", "false")
    monkeypatch.setenv("DIDE_MAX_BODY_BYTES", "1234")
    monkeypatch.setenv("DIDE_CORS_ORIGINS", "")
    monkeypatch.setenv("DIDE_BATCH_WAIT_MS", "2.5")
    get_settings.cache_clear()
    try:
        s = get_settings()
        assert s is get_settings()  # cached
        assert s.bundles == [tmp_path / "a", tmp_path / "b"]
        assert [k.get_secret_value() for k in s.api_keys] == ["k1", "k2"] and "k1" not in repr(s)
        assert s.batching is False and s.max_body_bytes == 1234 and s.cors_origins == [] and s.batch_wait_ms == 2.5
        assert s.batch_max == 32 and s.queue_max == 256 and s.request_timeout_s == 10 and s.max_text_chars == 500
        assert s.text_cache_size == 4096 and s.intra_op_threads == 1 and s.inline_max_ms == 5.0
    finally:
        get_settings.cache_clear()
    monkeypatch.setenv("DIDE_BATCH_MAX", "0")
    with pytest.raises(ValueError, match="batch_max"):
        Settings()


def test_dide_serve_refuses_to_start_without_bundles(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from service.app import main

    monkeypatch.setenv("DIDE_BUNDLES", "")
    get_settings.cache_clear()
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(["--port", "0"])
    finally:
        get_settings.cache_clear()
    assert exit_info.value.code == 2 and "DIDE_BUNDLES" in capsys.readouterr().err


def test_openapi_documents_every_endpoint_with_examples(make_settings: Callable[..., Settings]) -> None:
    app = create_app(make_settings(max_text_chars=77))
    with TestClient(app) as c:
        spec = c.get("/openapi.json").json()
    paths = spec["paths"]
    assert set(paths) == {
        "/vqa",
        "/entailment",
        "/reasoning",
        "/images",
        "/images/{image_id}",
        "/search/vqa",
        "/search/entailment",
        "/search/reasoning",
        "/healthz",
        "/readyz",
        "/metrics",
    }
    schemas = spec["components"]["schemas"]
    for path, ops in paths.items():
        for method, op in ops.items():
            ok = op["responses"]["200"]["content"]
            if path != "/metrics":
                ref = ok["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
                assert schemas[ref].get("examples"), f"{method} {path}: no response example"
            if method == "post":
                body = op["requestBody"]["content"]["application/json"]
                assert body["examples"], f"{path}: no request example"
                assert body["schema"]["$ref"].rsplit("/", 1)[1] in schemas
                assert {"401", "413", "415", "422", "503"} <= set(op["responses"])
                assert op["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorResponse")
    form = paths["/vqa"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert set(form["properties"]) == {"image", "image_id", "question", "top_k"}
    assert form["properties"]["question"]["maxLength"] == 77
    assert "multipart/form-data" not in paths["/reasoning"]["post"]["requestBody"]["content"]
    assert schemas["VQARequest"]["properties"]["question"]["maxLength"] == 77
    assert schemas["ReasoningRequest"]["properties"]["statement"]["maxLength"] == 77
    assert schemas["ReasoningSearchRequest"]["properties"]["statement"]["maxLength"] == 77
    assert schemas["VQARequest"]["oneOf"] == [{"required": ["image_id"]}, {"required": ["image"]}]
    # The documented examples are accepted as they are (shape-wise; their ids are not in this store).
    from service.schemas import REQUEST_MODELS

    for model in REQUEST_MODELS:
        for example in model.model_json_schema()["examples"]:
            model.model_validate_json(json.dumps(example))
