"""dide-export: bundle contents, parity figures, int8/fp16 agreement, atomic writes, model_id, loud failures."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest

from core.bundle import BUNDLE_FILES, SEARCH_FILES
from export import onnx_export
from export.onnx_export import OPSET, PARITY_TOL, main
from export.runtime import Bundle


def manifest_of(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def test_bundle_files_manifest_and_fp32_parity(tiny_bundle: Path, tiny_student_dir: Path) -> None:
    m = manifest_of(tiny_bundle)
    every = [*BUNDLE_FILES, *SEARCH_FILES]
    assert sorted(p.name for p in tiny_bundle.iterdir()) == sorted([*every, "manifest.json"])
    assert m["files"] == {n: hashlib.sha256((tiny_bundle / n).read_bytes()).hexdigest() for n in every}
    assert m["search"]["version"] == 1 and m["parity"]["fp32"]["search"]["max_abs_logit_diff"] < 1e-5
    assert (m["task"], m["dim"], m["opset"], m["precision"], m["num_labels"]) == ("vqa", 32, OPSET, "fp32", 13)
    assert len(m["model_id"]) == 16 and int(m["model_id"], 16) >= 0
    assert (
        m["source"]["checkpoint_sha256"]
        == hashlib.sha256((tiny_student_dir / "model.safetensors").read_bytes()).hexdigest()
    )
    assert json.loads((tiny_bundle / "preprocess.json").read_text())["max_text_len"] == 16
    parity = m["parity"]["fp32"]
    random_checks = [v for k, v in parity.items() if k.startswith("random")]
    assert {v["batch"] for v in random_checks} == {1, 7, 64}
    real = parity["real"]
    assert real["source"] == "easy-vqa test[:1000]" and real["examples"] == 1000
    for stats in [*random_checks, real]:
        assert stats["max_abs_logit_diff"] <= PARITY_TOL
        assert stats["argmax_agreement"] == 1.0
    assert real["accuracy"] == real["reference_accuracy"]


def test_graphs_have_dynamic_batch_and_sequence_axes_and_pinned_opset(tiny_bundle: Path) -> None:
    def dims(value_info) -> list:
        return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]

    image = onnx.load(str(tiny_bundle / "image_encoder.onnx"))
    text = onnx.load(str(tiny_bundle / "text_encoder.onnx"))
    head = onnx.load(str(tiny_bundle / "head.onnx"))
    assert dims(image.graph.input[0]) == ["batch", 3, 32, 32] and dims(image.graph.output[0]) == ["batch", 32]
    assert [i.name for i in text.graph.input] == ["input_ids", "attention_mask"]
    assert all(dims(i) == ["batch", "seq"] for i in text.graph.input)
    assert [i.name for i in head.graph.input] == ["text_embedding", "image_embedding"]
    assert head.graph.output[0].name == "logits" and dims(head.graph.output[0])[0] == "batch"
    for model in (image, text, head):
        assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == OPSET


def test_int8_records_agreement_and_shares_the_image_space(
    tiny_student_dir: Path, tiny_bundle: Path, tmp_path: Path
) -> None:
    out = tmp_path / "int8"
    assert main(["--student", str(tiny_student_dir), "--out", str(out), "--int8"]) == 0
    m = manifest_of(out)
    assert m["precision"] == "int8" and m["precision_by_file"]["image_encoder.onnx"] == "fp32"
    stats = m["parity"]["int8"]
    assert stats["source"] == "easy-vqa test[:1000]" and stats["examples"] == 1000
    assert 0.9 <= stats["argmax_agreement"] <= 1.0
    assert 0 < stats["max_abs_logit_diff"] < 0.5
    assert stats["accuracy_delta"] == pytest.approx(stats["accuracy"] - stats["reference_accuracy"])
    ops = {n.op_type for n in onnx.load(str(out / "text_encoder.onnx")).graph.node}
    assert "DynamicQuantizeLinear" in ops or "MatMulInteger" in ops
    assert (out / "text_encoder.onnx").stat().st_size < (tiny_bundle / "text_encoder.onnx").stat().st_size
    # Only the text side is quantised: same image tower, same embedding space, same store.
    assert m["model_id"] == manifest_of(tiny_bundle)["model_id"]
    assert (out / "image_encoder.onnx").read_bytes() == (tiny_bundle / "image_encoder.onnx").read_bytes()
    assert Bundle.load(out).encode_texts(["what color is the shape?"]).shape == (1, 32)


def test_fp16_records_agreement_and_gets_its_own_model_id(
    tiny_student_dir: Path, tiny_bundle: Path, tmp_path: Path
) -> None:
    out = tmp_path / "fp16"
    assert main(["--student", str(tiny_student_dir), "--out", str(out), "--fp16", "--eval-size", "200"]) == 0
    m = manifest_of(out)
    stats = m["parity"]["fp16"]
    assert m["precision"] == "fp16" and stats["examples"] == 200
    assert stats["provider"] == "CPUExecutionProvider" and "CPU" in stats["note"]
    assert stats["argmax_agreement"] >= 0.95 and stats["max_abs_logit_diff"] < 0.05
    assert m["model_id"] != manifest_of(tiny_bundle)["model_id"]  # fp16 image vectors are another space
    inits = onnx.load(str(out / "image_encoder.onnx")).graph.initializer
    assert {i.data_type for i in inits if len(i.dims) == 2} == {onnx.TensorProto.FLOAT16}


def test_failed_parity_fails_loudly_and_writes_nothing(
    tiny_student_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # fp32 graphs differ from torch by ~1e-7 here; a zero tolerance makes that a failure.
    monkeypatch.setattr(onnx_export, "PARITY_TOL", 0.0)
    out = tmp_path / "bundle"
    with caplog.at_level(logging.ERROR):
        assert main(["--student", str(tiny_student_dir), "--out", str(out), "--eval-size", "16"]) == 1
    assert "fp32 parity failed on random" in caplog.text and "limit 0" in caplog.text
    assert list(tmp_path.iterdir()) == []  # no bundle and no temp directory left behind


def test_export_replaces_a_bundle_atomically(tiny_student_dir: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "stale.txt").write_text("from an older export")
    onnx_export.export_bundle(tiny_student_dir, out, onnx_export.ExportOptions(eval_size=8))
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    assert oct(out.stat().st_mode & 0o777) == oct(0o755)
    assert manifest_of(out)["model_id"] == manifest_of(tiny_bundle)["model_id"]  # deterministic


def test_model_id_names_the_image_tower_only(tiny_student_factory: Callable[[str], Path], tmp_path: Path) -> None:
    import torch

    from training.student import load_student

    loaded = load_student(tiny_student_factory("vqa"))
    spec = loaded.image_spec.to_dict()
    base = onnx_export.model_id_of(loaded.model, spec, "fp32")
    with torch.no_grad():
        loaded.model.text_tower.word_embeddings.weight.add_(1.0)
        loaded.model.classifier[0].bias.add_(1.0)
    assert onnx_export.model_id_of(loaded.model, spec, "fp32") == base
    assert onnx_export.model_id_of(loaded.model, {**spec, "size": 64}, "fp32") != base
    with torch.no_grad():
        loaded.model.image_tower.cls_token.add_(1e-3)
    assert onnx_export.model_id_of(loaded.model, spec, "fp32") != base


@pytest.mark.parametrize("task", ["entailment", "reasoning"])
def test_other_tasks_export_with_real_parity(tiny_bundle_factory: Callable[[str], Path], task: str) -> None:
    m = manifest_of(tiny_bundle_factory(task))
    real = m["parity"]["fp32"]["real"]
    assert m["task"] == task and real["examples"] > 0 and real["source"].startswith("scenes")
    assert real["max_abs_logit_diff"] <= PARITY_TOL and real["argmax_agreement"] == 1.0
    head = onnx.load(str(tiny_bundle_factory(task) / "head.onnx"))
    expected = ["text_embedding", "image_embedding"] + (["image_embedding_2"] if task == "reasoning" else [])
    assert [i.name for i in head.graph.input] == expected


def test_a_student_trained_with_dropout_exports_with_parity(tmp_path: Path) -> None:
    """The export wrappers are made in training mode and torch.onnx.export restores their mode: without
    putting them in eval mode, the student's dropout was on during the parity checks and they failed."""
    import dataclasses

    import torch

    from core.preprocess import ImageSpec
    from training.student import DualEncoderStudent, save_student, tiny_config
    from training.tokenizer import train_wordpiece

    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny_config("entailment", 3, 200), dropout=0.1)
    student = DualEncoderStudent(cfg)
    tokenizer = train_wordpiece(["there is a red circle.", "a blue square is left of a circle."] * 4, vocab_size=200)
    directory = tmp_path / "student"
    save_student(student, directory, labels=["entailment", "neutral", "contradiction"], tokenizer=tokenizer,
                 image_spec=ImageSpec(size=32), data="scenes:train=4,test=32,seed=0")  # fmt: skip
    assert main(["--student", str(directory), "--out", str(tmp_path / "bundle"), "--eval-size", "16"]) == 0
