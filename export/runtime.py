"""The torch-free bundle runtime: a bundle directory loaded into ONNX Runtime sessions with its preprocessing."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from core.bundle import (
    HEAD,
    HEAD_INPUTS,
    HEAD_INPUTS_REASONING,
    HEAD_OUTPUT,
    IMAGE_ENCODER,
    IMAGE_INPUTS,
    IMAGE_OUTPUT,
    SCAN,
    TEXT_ENCODER,
    TEXT_INPUTS,
    TEXT_OUTPUT,
    BundleError,
    BundleFiles,
    read_bundle,
)
from core.preprocess import TextEncoder, decode_image

log = logging.getLogger(__name__)


def default_providers() -> list[str]:
    """CUDA when this onnxruntime build has it, then CPU."""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class Bundle:
    """A verified bundle: ONNX Runtime sessions for the image tower, text tower and head, plus preprocessing."""

    def __init__(self, files: BundleFiles, providers: list[str], threads: int | None) -> None:
        self.directory = files.directory
        self.manifest = files.manifest
        self.task: str = files.manifest["task"]
        self.model_id: str = files.manifest["model_id"]
        self.dim: int = int(files.manifest["dim"])
        self.labels: list[str] = files.labels
        self.image_spec = files.image_spec
        self.text = TextEncoder(Tokenizer.from_str(files.tokenizer_json), files.max_text_len)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        # Sessions are built from the verified bytes, never re-read from disk.
        blobs = files.blobs
        self._image = self._session(IMAGE_ENCODER, blobs, options, providers, IMAGE_INPUTS, IMAGE_OUTPUT)
        self._text = self._session(TEXT_ENCODER, blobs, options, providers, TEXT_INPUTS, TEXT_OUTPUT)
        head_inputs = HEAD_INPUTS_REASONING if self.task == "reasoning" else HEAD_INPUTS
        self._head = self._session(HEAD, blobs, options, providers, head_inputs, HEAD_OUTPUT)
        self.provider: str = self._image.get_providers()[0]
        self.providers = providers
        # Collection search (export.search): the head's weights and the scan graph, when the bundle has them.
        self.search_problem: str | None = files.search_problem()
        self.fusion: dict[str, np.ndarray] = {} if self.search_problem else files.fusion_arrays()
        self.scan_graph: bytes = b"" if self.search_problem else blobs[SCAN]

    def _session(
        self,
        name: str,
        blobs: dict[str, bytes],
        options: ort.SessionOptions,
        providers: list[str],
        inputs: tuple[str, ...],
        output: str,
    ) -> ort.InferenceSession:
        try:
            session = ort.InferenceSession(blobs[name], options, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for invalid models
            raise BundleError(f"{self.directory / name}: ONNX Runtime cannot load it: {e}") from None
        got_in = tuple(i.name for i in session.get_inputs())
        got_out = tuple(o.name for o in session.get_outputs())
        if got_in != inputs or got_out != (output,):
            raise BundleError(
                f"{self.directory / name}: graph has inputs {got_in} -> {got_out}, expected {inputs} -> {output}"
            )
        return session

    @classmethod
    def load(cls, directory: str | Path, providers: list[str] | None = None, *, threads: int | None = None) -> Bundle:
        """Load a bundle, verifying every file's sha256 against manifest.json first."""
        files = read_bundle(directory)
        available = ort.get_available_providers()
        providers = providers or default_providers()
        missing = [p for p in providers if p not in available]
        if missing:
            raise ValueError(f"execution providers {missing} are not in this onnxruntime build ({available})")
        bundle = cls(files, providers, threads)
        log.info(
            "loaded bundle %s: task %s, model_id %s, dim %d, precision %s, provider %s",
            files.directory,
            bundle.task,
            bundle.model_id,
            bundle.dim,
            files.manifest.get("precision"),
            bundle.provider,
        )
        return bundle

    def preprocess_images(self, blobs: list[bytes]) -> np.ndarray:
        """Image bytes -> pixels (B, 3, H, W) float32; raises ImageError for an undecodable image."""
        if not blobs:
            return np.empty((0, 3, self.image_spec.size, self.image_spec.size), np.float32)
        return np.stack([decode_image(b, self.image_spec) for b in blobs])

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        """Pixels (B, 3, H, W) float32 -> image embeddings (B, D) float32."""
        size = self.image_spec.size
        if pixels.ndim != 4 or pixels.shape[1:] != (3, size, size) or pixels.dtype != np.float32:
            raise ValueError(f"pixels must be float32 (B, 3, {size}, {size}), got {pixels.dtype} {pixels.shape}")
        return self._image.run([IMAGE_OUTPUT], {"pixels": np.ascontiguousarray(pixels)})[0]

    def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Texts -> (input_ids, attention_mask), int64 (B, L), L the longest text's tokens (<= max_text_len).

        Raises TextError for empty or long text."""
        return self.text(texts, trim=True)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Texts -> text embeddings (B, D) float32."""
        return self.encode_tokens(*self.tokenize(texts))

    def encode_tokens(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Token ids and mask, int64 (B, L) with L <= max_text_len -> text embeddings (B, D) float32."""
        if input_ids.shape != attention_mask.shape or input_ids.ndim != 2 or input_ids.shape[1] > self.text.max_len:
            raise ValueError(
                f"input_ids and attention_mask must both be (B, L<={self.text.max_len}), "
                f"got {input_ids.shape} and {attention_mask.shape}"
            )
        feeds = {
            "input_ids": input_ids.astype(np.int64, copy=False),
            "attention_mask": attention_mask.astype(np.int64, copy=False),
        }
        return self._text.run([TEXT_OUTPUT], feeds)[0]

    def head(self, text_emb: np.ndarray, image_emb: np.ndarray, image_emb2: np.ndarray | None = None) -> np.ndarray:
        """Text and image embeddings (B, D) -> logits (B, C); `image_emb2` is needed by, and only by, reasoning."""
        if self.task == "reasoning" and image_emb2 is None:
            raise ValueError("the reasoning head needs a second image embedding (image_emb2)")
        if self.task != "reasoning" and image_emb2 is not None:
            raise ValueError(f"the {self.task} head takes one image embedding; image_emb2 is for reasoning only")
        feeds = {"text_embedding": text_emb, "image_embedding": image_emb}
        if image_emb2 is not None:
            feeds["image_embedding_2"] = image_emb2
        for name, x in feeds.items():
            if x.ndim != 2 or x.shape != (len(text_emb), self.dim) or x.dtype != np.float32:
                raise ValueError(f"{name} must be float32 ({len(text_emb)}, {self.dim}), got {x.dtype} {x.shape}")
        return self._head.run([HEAD_OUTPUT], feeds)[0]

    def warmup(self) -> None:
        """Run every session once at batch 1 and 2, so the first request pays no set-up cost."""
        for b in (1, 2):
            image = self.encode_images(np.zeros((b, 3, self.image_spec.size, self.image_spec.size), np.float32))
            text = self.encode_texts(["warm up"] * b)
            self.head(text, image, image if self.task == "reasoning" else None)
