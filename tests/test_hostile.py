"""Hostile inputs beyond tests/test_service*.py: every image mode and container, bombs in every format, odd JSON
and multipart, and the memory a hostile image may cost a real server (bounded by the pixel limit)."""

from __future__ import annotations

import io
import socket
import statistics
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from bench.server import proc_bytes
from bench.soak import record_reliability
from export.runtime import Bundle
from service.app import create_app
from service.settings import Settings
from tests.live import QUESTION, LiveServer, b64, metric_sum, start_server, stop_server, wait_ready

MAX_BODY = 2_000_000


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


RGB = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 30, 3), dtype=np.uint8))
PNG = encode(RGB, "PNG")


def deep16(order: str) -> Image.Image:
    return Image.frombytes(
        f"I;16{order}", (30, 30), (np.arange(900, dtype=f"{'>' if order else '<'}u2") * 70).tobytes()
    )


# Valid images in every mode and container Pillow reads: each must be answered (200), as the runtime answers it.
ANSWERED: dict[str, Callable[[], bytes]] = {
    "float32-tiff": lambda: encode(Image.fromarray(np.random.default_rng(1).random((20, 20), np.float32)), "TIFF"),
    "int32-tiff": lambda: encode(Image.fromarray(np.arange(400, dtype=np.int32).reshape(20, 20) * 100_000), "TIFF"),
    "16bit-big-endian-tiff": lambda: encode(deep16("B"), "TIFF"),
    "1bit-png": lambda: encode(RGB.convert("1"), "PNG"),
    "grey-alpha-png": lambda: encode(RGB.convert("LA"), "PNG"),
    "palette-transparency-png": lambda: encode(RGB.convert("P"), "PNG", transparency=0),
    "cmyk-tiff": lambda: encode(RGB.convert("CMYK"), "TIFF"),
    "lab-tiff": lambda: encode(RGB.convert("LAB"), "TIFF"),
    "ycbcr-jpeg": lambda: encode(RGB.convert("YCbCr"), "JPEG"),
    "progressive-jpeg": lambda: encode(RGB, "JPEG", progressive=True),
    "animated-webp": lambda: encode(RGB, "WEBP", save_all=True, append_images=[RGB.rotate(90)], duration=50),
    "animated-png": lambda: encode(RGB, "PNG", save_all=True, append_images=[RGB.rotate(90)], duration=50),
    "gif-300-frames": lambda: encode(RGB, "GIF", save_all=True, append_images=[RGB.rotate(i) for i in range(300)]),
    "tiff-50-pages": lambda: encode(RGB, "TIFF", save_all=True, append_images=[RGB] * 50),
    "bmp": lambda: encode(RGB, "BMP"),
    "ico": lambda: encode(RGB, "ICO"),
    "ppm": lambda: encode(RGB, "PPM"),
    "1x20000": lambda: encode(Image.new("RGB", (1, 20_000), "red"), "PNG"),
    "20000x1": lambda: encode(Image.new("RGB", (20_000, 1), "blue"), "PNG"),
    "65535x1": lambda: encode(Image.new("RGB", (65_535, 1), "green"), "PNG"),
}


def jpeg_header(width: int, height: int) -> bytes:
    """A JPEG start-of-frame claiming width x height, and nothing to decode."""
    sof = struct.pack(">HBHHB", 17, 8, height, width, 3) + b"\x01\x11\x00\x02\x11\x00\x03\x11\x00"
    return b"\xff\xd8\xff\xc0" + sof + b"\xff\xd9"


def gif_header(width: int, height: int) -> bytes:
    screen = struct.pack("<HH", width, height) + b"\x00\x00\x00"
    return b"GIF89a" + screen + b",\x00\x00\x00\x00" + struct.pack("<HH", width, height) + b"\x00\x02\x02D\x01\x00;"


def bmp_header(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 0, 0, 0, 0)
    return b"BM" + struct.pack("<IHHI", 54, 0, 0, 54) + info


def webp_header(width: int, height: int) -> bytes:
    vp8x = b"\x00\x00\x00\x00" + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", 30) + b"WEBPVP8X" + struct.pack("<I", 10) + vp8x


def tiff_header(width: int, height: int) -> bytes:
    """A 1x1 TIFF whose ImageWidth / ImageLength tags are rewritten to width x height."""
    data = bytearray(encode(Image.new("L", (1, 1)), "TIFF"))
    entries = struct.unpack_from("<H", data, 8)[0]
    for i in range(entries):
        at = 10 + 12 * i
        tag, kind = struct.unpack_from("<HH", data, at)
        if tag in (256, 257) and kind == 4:  # LONG
            struct.pack_into("<I", data, at + 8, width if tag == 256 else height)
    return bytes(data)


def png_text_bomb(kind: bytes) -> bytes:
    """A valid PNG carrying a compressed text / ICC chunk that inflates to 50 MB."""
    bomb = zlib.compress(b"a" * 50_000_000, 9)
    payload = b"k\0\0" + bomb if kind == b"zTXt" else b"icc\0\0" + bomb
    return PNG[:33] + chunk(kind, payload) + PNG[33:]  # after IHDR


def real_png_bomb() -> bytes:
    """A complete, valid 10000x10000 PNG (100 Mpixel, twice the limit) in about 100 kB."""
    return encode(Image.new("L", (10_000, 10_000)), "PNG", compress_level=9)


REFUSED: dict[str, Callable[[], bytes]] = {
    "truncated-jpeg": lambda: encode(RGB, "JPEG")[:300],
    "truncated-gif": lambda: encode(RGB, "GIF")[:200],
    "ztxt-bomb": lambda: png_text_bomb(b"zTXt"),
    "iccp-bomb": lambda: png_text_bomb(b"iCCP"),
    "real-100mpx-png": real_png_bomb,
    "jpeg-header-65000x65000": lambda: jpeg_header(65_000, 65_000),
    "gif-header-65535x65535": lambda: gif_header(65_535, 65_535),
    "bmp-header-60000x60000": lambda: bmp_header(60_000, 60_000),
    "webp-header-16383x16383": lambda: webp_header(16_383, 16_383),
    "tiff-header-60000x60000": lambda: tiff_header(60_000, 60_000),
}


@pytest.fixture(scope="module")
def vqa_bundle(tiny_bundle: Path) -> Bundle:
    return Bundle.load(tiny_bundle)


@pytest.fixture(scope="module")
def client(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = Settings(bundles=[tiny_bundle], store=tmp_path_factory.mktemp("store"), max_body_bytes=MAX_BODY)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


@pytest.mark.parametrize("name", list(ANSWERED))
def test_every_image_mode_and_container_is_answered_as_the_runtime_answers_it(
    client: TestClient, vqa_bundle: Bundle, name: str
) -> None:
    data = ANSWERED[name]()
    r = client.post("/vqa", json={"image": b64(data), "question": QUESTION, "top_k": 1})
    assert r.status_code == 200, r.text
    logits = vqa_bundle.head(
        vqa_bundle.encode_texts([QUESTION]), vqa_bundle.encode_images(vqa_bundle.preprocess_images([data]))
    )[0]
    assert r.json()["answers"][0]["answer"] == vqa_bundle.labels[int(np.argmax(logits))]
    multipart = client.post("/vqa", files={"image": ("x", data, "image/*")}, data={"question": QUESTION, "top_k": "1"})
    assert multipart.status_code == 200 and multipart.json()["answers"] == r.json()["answers"]


@pytest.mark.parametrize("name", list(REFUSED))
def test_bombs_and_broken_images_in_every_format_are_a_422(client: TestClient, name: str) -> None:
    data = REFUSED[name]()
    started = time.perf_counter()
    for r in (
        client.post("/vqa", json={"image": b64(data), "question": QUESTION}),
        client.post("/images", files={"image": ("x", data, "image/*")}),
    ):
        assert r.status_code == 422 and r.json()["code"] == "invalid_image", r.text
    assert time.perf_counter() - started < 10  # refused from the header, not after decoding the pixels


JSON = {"content-type": "application/json"}
# (body, expected status): byte-level oddities of JSON that a client library would never send.
ODD_JSON: dict[str, tuple[bytes, int]] = {
    "utf8-bom": (b'\xef\xbb\xbf{"image_id": "x", "question": "q"}', 422),
    "utf16": ('{"image_id": "x", "question": "q"}'.encode("utf-16"), 422),
    "latin1-text": ('{"image_id": "x", "question": "caf\xe9"}'.encode("latin-1"), 422),
    "5000-digit-int": (b'{"image_id": "x", "question": "q", "top_k": ' + b"9" * 5000 + b"}", 422),
    "float-overflow": (b'{"image_id": "x", "question": "q", "top_k": 1e999999}', 422),
    "nan": (b'{"image_id": "x", "question": "q", "top_k": NaN}', 422),
    "100k-keys": (("{" + ",".join(f'"k{i}": 1' for i in range(100_000)) + "}").encode(), 422),
    "400k-element-array": (b'{"image_id": "x", "question": "q", "z": [' + b"1," * 400_000 + b"1]}", 422),
    "1.5MB-string": (b'{"image_id": "' + b"x" * 1_500_000 + b'", "question": "q"}', 422),
    "10000-deep-in-a-string-field": (b'{"image_id": "x", "question": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", 422),
    "duplicate-keys-last-wins": (b'{"image_id": "a", "image_id": "unknown", "question": "q"}', 404),
}


@pytest.mark.parametrize("name", list(ODD_JSON))
def test_odd_json_is_a_json_4xx(client: TestClient, name: str) -> None:
    body, status = ODD_JSON[name]
    r = client.post("/vqa", content=body, headers=JSON)
    assert r.status_code == status, r.text[:300]
    assert set(r.json()) == {"code", "message"} and len(r.text) < 2000  # the input is never echoed back


@pytest.mark.parametrize(
    "body",
    [{"image": None}, {"image": None, "name": "catalogue-0042"}, {"image": b64(PNG), "name": None}],
    ids=["null-image", "null-image-with-name", "null-name"],
)
def test_null_fields_of_an_upload_are_a_422(client: TestClient, body: dict) -> None:
    """Found by schemathesis: `{"image": null, "name": ...}` used to reach a length check on None (a 500)."""
    r = client.post("/images", json=body)
    assert r.status_code == 422 and r.json()["code"] == "invalid_request", r.text


def multipart(parts: list[tuple[str, bytes]], boundary: bytes = b"B") -> bytes:
    out = b""
    for header, value in parts:
        out += b"--" + boundary + b"\r\n" + header.encode() + b"\r\n\r\n" + value + b"\r\n"
    return out + b"--" + boundary + b"--\r\n"


FORM = {"content-type": "multipart/form-data; boundary=B"}
QUESTION_PART = ('Content-Disposition: form-data; name="question"', QUESTION.encode())
IMAGE_PART = ('Content-Disposition: form-data; name="image"; filename="x.png"\r\nContent-Type: image/png', PNG)
ODD_FORMS: dict[str, tuple[bytes, dict[str, str]]] = {
    "50-fields": (
        multipart([IMAGE_PART] + [(f'Content-Disposition: form-data; name="f{i}"', b"1") for i in range(50)]),
        FORM,
    ),
    "5-files": (multipart([IMAGE_PART] * 5 + [QUESTION_PART]), FORM),
    "2000-header-lines": (multipart([("\r\n".join([QUESTION_PART[0]] * 2000), b"q")]), FORM),
    "no-boundary": (b"x", {"content-type": "multipart/form-data"}),
    "unterminated": (multipart([IMAGE_PART, QUESTION_PART])[:-8], FORM),
    "file-as-question": (
        multipart([IMAGE_PART, ('Content-Disposition: form-data; name="question"; filename="q.txt"', b"q")]),
        FORM,
    ),
}


@pytest.mark.parametrize("name", list(ODD_FORMS))
def test_odd_multipart_is_a_json_422(client: TestClient, name: str) -> None:
    body, headers = ODD_FORMS[name]
    r = client.post("/vqa", content=body, headers=headers)
    assert r.status_code == 422 and r.json()["code"] in ("invalid_form", "invalid_request"), r.text[:300]


def test_odd_but_valid_text_is_answered(client: TestClient) -> None:
    """Text a tokenizer may choke on, in JSON and in a form (where undecodable bytes become U+FFFD)."""
    image_id = client.post("/images", json={"image": b64(PNG)}).json()["image_id"]
    for text in ("a\u0000b", "\u202eright-to-left\u202c", "🟥🔺" * 50, "漢字" * 200, "\t\n what?\r\n"):
        r = client.post("/vqa", json={"image_id": image_id, "question": text})
        assert r.status_code == 200, (text, r.text)
    r = client.post(
        "/vqa",
        content=multipart([IMAGE_PART, ('Content-Disposition: form-data; name="question"', b"\xff\xfe?")]),
        headers=FORM,
    )
    assert r.status_code == 200, r.text


# --- what a hostile image may cost a real server ------------------------------------------------------------

SIDE = 5000  # 25 Mpixel: half the bundle's 50 Mpixel limit
BYTES_PER_PIXEL_BOUND = 40  # the worst decode path (16-bit greyscale) peaks near 26 bytes per pixel


def big_image(mode: str, side: int = SIDE) -> bytes:
    y = np.arange(side, dtype=np.uint32)
    plane = ((y[:, None] // 8 + y[None, :] // 8) % 256).astype(np.uint8)
    if mode == "I;16":
        img = Image.fromarray(plane.astype(np.uint16) * 257)
    else:
        img = Image.fromarray(np.stack([plane] * len(mode), -1), mode)
    return encode(img, "PNG", compress_level=6)


def peak_growth(server: LiveServer, body: dict) -> tuple[int, int]:
    """(status, bytes): the server's peak RSS over one request above its RSS before it (VmHWM reset first)."""
    pid = server.process.pid
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = proc_bytes(pid, "VmRSS")
    r = httpx.post(f"{server.url}/vqa", json=body, timeout=120)
    return r.status_code, proc_bytes(pid, "VmHWM") - before


@pytest.mark.slow
def test_a_hostile_image_costs_a_bounded_amount_of_memory(tiny_bundle: Path, tmp_path: Path) -> None:
    env = {
        "DIDE_BUNDLES": str(tiny_bundle),
        "DIDE_STORE": str(tmp_path / "store"),
        "DIDE_THREADS": "1",
        "DIDE_REQUEST_TIMEOUT_S": "120",
        "DIDE_LOG_LEVEL": "WARNING",
    }
    server = start_server(env, tmp_path / "server.log")
    try:
        wait_ready(server)
        figures: dict[str, dict] = {}
        for mode in ("RGB", "RGBA", "I;16"):
            data = big_image(mode)
            status, grew = peak_growth(server, {"image": b64(data), "question": QUESTION})
            assert status == 200
            per_pixel = grew / SIDE**2
            figures[f"{SIDE}x{SIDE} {mode} PNG"] = {
                "body_kB": len(data) // 1024,
                "peak_MiB": grew // 2**20,
                "bytes_per_pixel": round(per_pixel, 1),
            }
            assert per_pixel < BYTES_PER_PIXEL_BOUND, figures
        bomb_names = ("real-100mpx-png", "gif-header-65535x65535", "ztxt-bomb")
        bombs = [peak_growth(server, {"image": b64(REFUSED[name]()), "question": QUESTION}) for name in bomb_names]
        assert all(status == 422 for status, _ in bombs)
        worst_bomb = max(grew for _, grew in bombs)
        assert worst_bomb < 64 * 2**20, worst_bomb  # refused before any pixel is decoded
        assert httpx.get(f"{server.url}/readyz").status_code == 200
    finally:
        stop_server(server)
    assert "Traceback" not in server.log_text()
    record_reliability(
        "hostile",
        {
            "peak_memory_per_request": figures,
            "bombs_peak_MiB": round(worst_bomb / 2**20, 1),
            "worst_bytes_per_pixel": max(f["bytes_per_pixel"] for f in figures.values()),
            "note": "one decode per worker thread (DIDE_THREADS) at a time; pixels are capped by the bundle's "
            "max_pixels (50 Mpixel by default)",
            "median_bytes_per_pixel": statistics.median(f["bytes_per_pixel"] for f in figures.values()),
        },
    )


# --- clients that stop half-way -------------------------------------------------------------------------------


def half_request(url: str, declared: int, sent: bytes) -> socket.socket:
    """A socket that has sent a /vqa request's headers (declaring `declared` body bytes) and `sent` of its body."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    head = f"POST /vqa HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {declared}\r\n\r\n"
    sock.sendall(head.encode() + sent)
    return sock


@pytest.mark.slow
def test_clients_that_stop_half_way_are_cut_at_the_deadline_and_are_not_server_errors(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    deadline = 1.0
    env = {
        "DIDE_BUNDLES": str(tiny_bundle),
        "DIDE_STORE": str(tmp_path / "store"),
        "DIDE_REQUEST_TIMEOUT_S": str(deadline),
    }
    server = start_server(env, tmp_path / "server.log")
    try:
        wait_ready(server)
        # A slow client (slowloris): half a body, then silence. It is answered 503 at the deadline, not held.
        slow = half_request(server.url, 1000, b'{"image_id": "x", ')
        started = time.perf_counter()
        answer = slow.recv(4096).decode()
        waited = time.perf_counter() - started
        while "}" not in answer and (more := slow.recv(4096)):  # the body may follow the headers separately
            answer += more.decode()
        slow.close()
        assert answer.startswith("HTTP/1.1 503") and "deadline_exceeded" in answer, answer
        assert deadline * 0.9 < waited < deadline + 2, waited
        # Clients that hang up half-way through their body: nobody to answer, and no server error either.
        for _ in range(5):
            half_request(server.url, 1000, b'{"image_id": "x", ').close()
        time.sleep(0.5)
        metrics = httpx.get(f"{server.url}/metrics").text
        assert httpx.post(f"{server.url}/vqa", json={"image": b64(PNG), "question": QUESTION}).status_code == 200
    finally:
        stop_server(server)
    log = server.log_text()
    assert "Traceback" not in log and "unhandled error" not in log, log[-3000:]
    assert metric_sum(metrics, "dide_request_duration_seconds_count", status_class="5xx") == 1  # the deadline 503
    assert metric_sum(metrics, "dide_request_duration_seconds_count", endpoint="/vqa", status_class="4xx") == 5
