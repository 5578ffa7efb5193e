"""Images to send to a live server, for the benchmarks and tests: random, solid and distinct PNGs, and base64."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def random_png(seed: int, size: tuple[int, int] = (40, 40), mode: str = "RGB") -> bytes:
    """A random image of `size` (width, height) in `mode`, encoded as PNG."""
    rng = np.random.default_rng(seed)
    return encode_png(Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode))


def solid_png(color: tuple[int, int, int], size: int = 32) -> bytes:
    """A square image of one colour, encoded as PNG."""
    return encode_png(Image.new("RGB", (size, size), color))


def distinct_pngs(base: bytes, first: int, n: int) -> list[bytes]:
    """n PNGs that differ from `base` (and from each other) in the first three pixels: each is new to the cache."""
    pixels = np.array(Image.open(io.BytesIO(base)).convert("RGB"))
    out = []
    for i in range(first, first + n):
        pixels[0, :3, 0] = [(i >> 16) & 255, (i >> 8) & 255, i & 255]
        out.append(encode_png(Image.fromarray(pixels)))
    return out


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
