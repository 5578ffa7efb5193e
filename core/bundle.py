"""The bundle format (export → cache → service contract): its file names, graph names, and its one writer and reader.

A bundle is a directory holding three ONNX graphs, `tokenizer.json`, `preprocess.json`, `labels.json` and
`manifest.json`, which names the task, the image-embedding space (`model_id`), the embedding width and the
sha256 of every other file. The ONNX graphs themselves are made by `export.onnx_export` (it needs torch);
everything else about the format is written and read here.

Optional since search version 1 (bundles without them still load; only collection search needs them):
`fusion.npz`, the fusion MLP's and task head's fp32 weights, and `scan.onnx`, a weight-free graph of the
head after its first layer (weights are fed at run time), which `export.search` runs over cached images.
The manifest then carries `"search": {"version": 1, ...}`.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.preprocess import ImageSpec

IMAGE_ENCODER = "image_encoder.onnx"
TEXT_ENCODER = "text_encoder.onnx"
HEAD = "head.onnx"
TOKENIZER = "tokenizer.json"
PREPROCESS = "preprocess.json"
LABELS = "labels.json"
MANIFEST = "manifest.json"
GRAPHS = (IMAGE_ENCODER, TEXT_ENCODER, HEAD)
BUNDLE_FILES = (*GRAPHS, TOKENIZER, PREPROCESS, LABELS)
BUNDLE_FORMAT = 1
# Collection search (optional files): the head's weights and the weight-free scan graph over cached images.
FUSION = "fusion.npz"
SCAN = "scan.onnx"
SEARCH_FILES = (FUSION, SCAN)
SEARCH_VERSION = 1
# What every manifest says, whoever wrote the bundle; the exporter adds parity, provenance and versions.
REQUIRED = ("task", "model_id", "dim", "precision")

# The ONNX graphs' input and output names, fixed by the bundle contract.
IMAGE_INPUTS, IMAGE_OUTPUT = ("pixels",), "image_embedding"
TEXT_INPUTS, TEXT_OUTPUT = ("input_ids", "attention_mask"), "text_embedding"
HEAD_INPUTS = ("text_embedding", "image_embedding")
HEAD_INPUTS_REASONING = (*HEAD_INPUTS, "image_embedding_2")
HEAD_OUTPUT = "logits"
# scan.onnx: (B, 2D) image parts + (1, 2D) text part -> (B, R) logits of the R head rows fed in.
SCAN_INPUTS = ("image_part", "text_part", "ln1_w", "ln1_b", "w2", "b2", "w3", "b3", "ln2_w", "ln2_b", "w4", "b4")
SCAN_OUTPUT = "logits"
# fusion.npz: torch Linear weights (out, in) and LayerNorm parameters, float32; eps as 0-d arrays.
FUSION_ARRAYS = (
    *("fusion_w1", "fusion_b1", "fusion_ln_w", "fusion_ln_b", "fusion_ln_eps", "fusion_w2", "fusion_b2"),
    *("cls_w1", "cls_b1", "cls_ln_w", "cls_ln_b", "cls_ln_eps", "cls_w2", "cls_b2"),
)


class BundleError(RuntimeError):
    """The bundle is missing a file, or a file is truncated or altered (the message names it)."""


# --- writing -------------------------------------------------------------------------------------------


def write_metadata(
    directory: Path, *, tokenizer_json: str, image_spec: ImageSpec, max_text_len: int, labels: list[str]
) -> None:
    """Write tokenizer.json, preprocess.json and labels.json beside the graphs."""
    (directory / TOKENIZER).write_text(tokenizer_json)
    preprocess = {"image": image_spec.to_dict(), "max_text_len": max_text_len}
    (directory / PREPROCESS).write_text(json.dumps(preprocess, indent=2))
    (directory / LABELS).write_text(json.dumps(labels, indent=2))


def write_fusion(directory: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write fusion.npz (every name in FUSION_ARRAYS, float32); scan.onnx is written beside it by the exporter."""
    missing = [n for n in FUSION_ARRAYS if n not in arrays]
    if missing:
        raise ValueError(f"fusion.npz needs {', '.join(missing)}")
    with open(directory / FUSION, "wb") as f:
        np.savez(f, **{n: np.asarray(arrays[n], np.float32) for n in FUSION_ARRAYS})  # type: ignore[arg-type]


def file_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every file in the bundle directory but the manifest."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != MANIFEST
    }


def write_manifest(directory: Path, manifest: dict) -> dict:
    """Write manifest.json: `manifest` plus the format number and every file's sha256; the manifest written.

    Call it last (again after any file changes): the hashes are taken from the files as they are now.
    """
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise ValueError(f"a bundle manifest needs {', '.join(missing)}")
    full = {"format": BUNDLE_FORMAT, **manifest, "files": file_hashes(directory)}
    if all((directory / name).is_file() for name in SEARCH_FILES):
        full["search"] = {"version": SEARCH_VERSION, "precision": "fp32", **manifest.get("search", {})}
    (directory / MANIFEST).write_text(json.dumps(full, indent=2) + "\n")
    return full


# --- reading -------------------------------------------------------------------------------------------


def read_manifest(directory: str | Path) -> dict:
    """The bundle's manifest.json, checked for a known format; BundleError naming the file otherwise."""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        raise BundleError(
            f"{directory / MANIFEST} not found: is {directory} a bundle written by dide-export?"
        ) from None
    except (OSError, ValueError) as e:
        raise BundleError(f"{directory / MANIFEST} cannot be read: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else manifest
        raise BundleError(f"{directory / MANIFEST}: unsupported bundle format {got!r}")
    return manifest


@dataclass(frozen=True)
class BundleFiles:
    """A bundle's manifest and the verified bytes of every file it lists."""

    directory: Path
    manifest: dict
    blobs: dict[str, bytes]

    @property
    def labels(self) -> list[str]:
        return json.loads(self.blobs[LABELS])

    @property
    def image_spec(self) -> ImageSpec:
        return ImageSpec.from_dict(json.loads(self.blobs[PREPROCESS])["image"])

    @property
    def max_text_len(self) -> int:
        return int(json.loads(self.blobs[PREPROCESS])["max_text_len"])

    @property
    def tokenizer_json(self) -> str:
        return self.blobs[TOKENIZER].decode()

    def search_problem(self) -> str | None:
        """Why this bundle cannot search a collection (what to do about it), or None when it can."""
        search = self.manifest.get("search")
        if not isinstance(search, dict) or any(name not in self.blobs for name in SEARCH_FILES):
            return (
                f"the bundle {self.directory} has no search files ({', '.join(SEARCH_FILES)}): it was exported "
                "before collection search existed; export it again with dide-export"
            )
        if search.get("version") != SEARCH_VERSION:
            got = search.get("version")
            return f"the bundle {self.directory} has search version {got!r}; this code reads {SEARCH_VERSION}"
        return None

    def fusion_arrays(self) -> dict[str, np.ndarray]:
        """fusion.npz's arrays (float32); BundleError when the bundle has none or they are incomplete."""
        problem = self.search_problem()
        if problem is not None:
            raise BundleError(problem)
        with np.load(io.BytesIO(self.blobs[FUSION]), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
        missing = [n for n in FUSION_ARRAYS if n not in arrays]
        if missing:
            raise BundleError(f"{self.directory / FUSION} lacks {', '.join(missing)}")
        return arrays


def read_bundle(directory: str | Path) -> BundleFiles:
    """Read every file the manifest lists, checking each one's sha256; BundleError naming the first bad file."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    files = manifest.get("files", {})
    for name in BUNDLE_FILES:
        if name not in files:
            raise BundleError(f"{directory / MANIFEST} does not list {name}")
    blobs: dict[str, bytes] = {}
    for name, digest in files.items():
        path = directory / name
        try:
            data = path.read_bytes()
        except OSError as e:
            raise BundleError(f"{path}: cannot read it: {e.strerror}") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise BundleError(f"{path}: sha256 does not match the manifest (truncated or altered)")
        blobs[name] = data
    return BundleFiles(directory, manifest, blobs)
