"""The one torch-free preprocessing implementation: image bytes to pixels, text to token ids."""

from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tokenizers import Tokenizer


class ImageError(ValueError):
    """The bytes are not a decodable image, or the image is too large to accept."""


class TextError(ValueError):
    """The text is empty or too long to encode."""


@dataclass(frozen=True)
class ImageSpec:
    """How images become model input: square resize, then (x/255 - mean) / std, channels first."""

    size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    # Decompression-bomb guard: the header's width*height is checked before any pixel is decoded.
    max_pixels: int = 50_000_000

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ImageSpec:
        return cls(
            size=int(d["size"]),
            mean=tuple(float(x) for x in d["mean"]),
            std=tuple(float(x) for x in d["std"]),
            max_pixels=int(d.get("max_pixels", 50_000_000)),
        )


def decode_image(data: bytes, spec: ImageSpec) -> np.ndarray:
    """Decode image bytes to float32 pixels of shape (3, size, size); raise ImageError on bad input."""
    return normalize(decode_rgb(data, spec), spec)


def decode_rgb(data: bytes, spec: ImageSpec) -> np.ndarray:
    """Decode image bytes to resized uint8 RGB of shape (size, size, 3), the cacheable middle step."""
    if not data:
        raise ImageError("the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > spec.max_pixels:
                raise ImageError(f"the image is {width}x{height} pixels, over the limit of {spec.max_pixels} pixels")
            img.seek(0)  # the first frame of an animation
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"the image is too large to decode: {e}") from None
    except UnidentifiedImageError:
        raise ImageError("the bytes are not a decodable image (no PNG, JPEG, GIF, WebP, BMP or TIFF header)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"the bytes are not a decodable image: {e}") from None
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite transparency over white so the result does not depend on hidden colour values.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    elif img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits by the type's range, not by clipping.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max(initial=0) > 255 or img.mode.startswith("I;16") else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    img = img.convert("RGB").resize((spec.size, spec.size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def normalize(rgb: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """uint8 (..., H, W, 3) to float32 (..., 3, H, W) with the spec's mean and std."""
    x = rgb.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))


def load_image(path: str | Path, spec: ImageSpec) -> np.ndarray:
    """Read and decode one image file; errors name the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ImageError(f"{path}: cannot read the image file: {e.strerror}") from None
    try:
        return decode_image(data, spec)
    except ImageError as e:
        raise ImageError(f"{path}: {e}") from None


class TextEncoder:
    """A `tokenizers` tokenizer: texts to (ids, mask), both int64 (B, L).

    L is `max_len` (fixed, as training pre-tokenises whole datasets), or with `trim` the longest text of
    the call: attention masks the padding, so the result is the same and a short question stops paying
    for max_len positions in the text tower (what the runtime does).
    """

    def __init__(self, tokenizer: Tokenizer, max_len: int, max_chars: int = 1000) -> None:
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.max_chars = max_chars
        self.pad_id = tokenizer.token_to_id("[PAD]") or 0
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=max_len)

    @classmethod
    def from_file(cls, path: str | Path, max_len: int) -> TextEncoder:
        return cls(Tokenizer.from_file(str(path)), max_len)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def __call__(self, texts: list[str], trim: bool = False) -> tuple[np.ndarray, np.ndarray]:
        for t in texts:
            if not isinstance(t, str) or not t.strip():
                raise TextError("the text is empty")
            if len(t) > self.max_chars:
                raise TextError(f"the text is {len(t)} characters long, over the limit of {self.max_chars}")
        encodings = self.tokenizer.encode_batch(texts)
        length = max((len(e.ids) for e in encodings), default=1) if trim else self.max_len
        ids = np.full((len(texts), length), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(texts), length), dtype=np.int64)
        for i, enc in enumerate(encodings):
            n = len(enc.ids)
            ids[i, :n] = enc.ids
            mask[i, :n] = 1
        return ids, mask
