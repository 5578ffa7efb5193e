"""The torch-free bundle runtime: sessions, preprocessing, hash checks, parity with torch, no torch import."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import easy_vqa
import numpy as np
import pytest

from core.preprocess import ImageError, TextError, decode_image
from export.runtime import Bundle, BundleError

ROOT = Path(__file__).resolve().parents[1]


def easy_vqa_images(n: int) -> list[Path]:
    paths = easy_vqa.get_test_image_paths()
    return [Path(paths[i]) for i in range(n)]


@pytest.fixture(scope="module")
def bundle(tiny_bundle: Path) -> Bundle:
    return Bundle.load(tiny_bundle)


def test_load_reports_provider_and_metadata(bundle: Bundle, tiny_bundle: Path) -> None:
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert bundle.provider == "CPUExecutionProvider"  # this machine's onnxruntime has no CUDA
    assert (bundle.task, bundle.dim, bundle.model_id) == ("vqa", 32, manifest["model_id"])
    assert bundle.labels == sorted(easy_vqa.get_answers())
    assert bundle.image_spec.size == 32 and bundle.text.max_len == 16
    bundle.warmup()


def test_runtime_matches_torch_on_real_inputs(bundle: Bundle, tiny_student_dir: Path) -> None:
    import torch

    from training.student import load_student

    loaded = load_student(tiny_student_dir)
    blobs = [p.read_bytes() for p in easy_vqa_images(8)]
    questions = ["what shape is in the image?", "is there a blue circle?"] * 4
    pixels = bundle.preprocess_images(blobs)
    assert pixels.shape == (8, 3, 32, 32) and pixels.dtype == np.float32
    assert np.array_equal(pixels[3], decode_image(blobs[3], loaded.image_spec))
    ids, mask = bundle.tokenize(questions)
    longest = int(mask.sum(1).max())
    assert ids.dtype == np.int64 and ids.shape == (8, longest) and longest < 16  # padded to the longest, not 16
    padded_ids, padded_mask = loaded.text(questions)
    assert padded_ids.shape == (8, 16) and np.array_equal(padded_ids[:, :longest], ids)
    logits = bundle.head(bundle.encode_texts(questions), bundle.encode_images(pixels))
    with torch.no_grad():  # the reference runs at the full padded length: trimming changes nothing
        expected = loaded.model(
            torch.from_numpy(padded_ids), torch.from_numpy(padded_mask), torch.from_numpy(pixels)
        ).numpy()
    assert logits.shape == (8, 13)
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
    assert (logits.argmax(1) == expected.argmax(1)).all()


def test_bad_inputs_raise_value_errors(bundle: Bundle) -> None:
    with pytest.raises(ImageError):
        bundle.preprocess_images([b"GIF89a not really"])
    with pytest.raises(TextError):
        bundle.tokenize(["   "])
    with pytest.raises(ValueError, match="pixels must be float32"):
        bundle.encode_images(np.zeros((1, 3, 64, 64), np.float32))
    emb = np.zeros((2, 32), np.float32)
    with pytest.raises(ValueError, match="takes one image embedding"):
        bundle.head(emb, emb, emb)
    with pytest.raises(ValueError, match="image_embedding must be"):
        bundle.head(emb, np.zeros((2, 16), np.float32))


def test_encode_images_across_batch_sizes(bundle: Bundle) -> None:
    pixels = bundle.preprocess_images([p.read_bytes() for p in easy_vqa_images(64)])
    full = bundle.encode_images(pixels)
    assert np.array_equal(full, bundle.encode_images(pixels))  # same batch: bit-identical
    for b in (1, 7, 32):
        parts = np.concatenate([bundle.encode_images(pixels[a : a + b]) for a in range(0, 64, b)])
        # Different batch sizes may take different kernels; they agree to float32 rounding.
        np.testing.assert_allclose(parts, full, atol=1e-6, rtol=0)


def test_reasoning_head_takes_two_images(tiny_bundle_factory: Callable[[str], Path]) -> None:
    bundle = Bundle.load(tiny_bundle_factory("reasoning"))
    emb = bundle.encode_images(np.zeros((3, 3, 32, 32), np.float32))
    text = bundle.encode_texts(["the left image has two circles"] * 3)
    assert bundle.head(text, emb, emb).shape == (3, 2)
    with pytest.raises(ValueError, match="needs a second"):
        bundle.head(text, emb)


@pytest.mark.parametrize(
    "damage",
    ["flip a byte in head.onnx", "truncate image_encoder.onnx", "delete tokenizer.json", "unlist labels.json"],
)
def test_tampered_bundle_is_refused_naming_the_file(tiny_bundle: Path, tmp_path: Path, damage: str) -> None:
    bad = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bad)
    name = damage.split()[-1]
    if damage.startswith("flip"):
        data = bytearray((bad / name).read_bytes())
        data[len(data) // 2] ^= 0x01
        (bad / name).write_bytes(bytes(data))
    elif damage.startswith("truncate"):
        (bad / name).write_bytes((bad / name).read_bytes()[:1000])
    elif damage.startswith("delete"):
        (bad / name).unlink()
    else:
        manifest = json.loads((bad / "manifest.json").read_text())
        del manifest["files"][name]
        (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=name.replace(".", r"\.")):
        Bundle.load(bad)


def test_missing_manifest_is_a_bundle_error(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"manifest\.json not found"):
        Bundle.load(tmp_path)


TORCH_FREE = """
import json, sys
from pathlib import Path
from export.runtime import Bundle
from export.cache_cli import main
bundle_dir, images, store = sys.argv[1:4]
bundle = Bundle.load(bundle_dir)
blobs = [p.read_bytes() for p in sorted(Path(images).iterdir())]
logits = bundle.head(bundle.encode_texts(["what color is the shape?"] * len(blobs)),
                     bundle.encode_images(bundle.preprocess_images(blobs)))
codes = [main(["build", "--bundle", bundle_dir, "--images", images, "--store", store]),
         main(["verify", "--store", store, "--bundle", bundle_dir]),
         main(["similar", "--store", store, "--id", "0", "-k", "2"])]
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "training", "transformers"))
print(json.dumps({"shape": list(logits.shape), "codes": codes, "heavy": heavy}))
"""


def test_runtime_and_cache_cli_never_import_torch(tiny_bundle: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for i, path in enumerate(easy_vqa_images(5)):
        shutil.copyfile(path, images / f"{i}.png")
    proc = subprocess.run(
        [sys.executable, "-c", TORCH_FREE, str(tiny_bundle), str(images), str(tmp_path / "store")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"shape": [5, 13], "codes": [0, 0, 0], "heavy": []}
