"""dide-export --teacher: the teacher as one ONNX graph, its fp32 parity, int8 agreement and loud failures."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from export import onnx_export
from export.onnx_export import OPSET, PARITY_TOL, main
from export.teacher_export import read_metadata, torch_teacher_logits
from tests.conftest import EASY_VQA_SENTENCES


def make_tiny_teacher(directory: Path, task: str) -> Path:
    """Save a tiny random teacher for `task` (D=32, 2 layers, 32x32 images, 8x8 patches) with its data spec."""
    import easy_vqa
    import torch

    from training.teacher import build_teacher
    from training.tokenizer import train_wordpiece

    labels, data = (
        (sorted(easy_vqa.get_answers()), "easy-vqa") if task == "vqa" else ([], "scenes:train=4,test=32,seed=0")
    )
    torch.manual_seed(0)
    teacher = build_teacher("tiny", task, labels, train_wordpiece(EASY_VQA_SENTENCES, 200), data, dropout=0.0)
    teacher.save(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_teacher(tmp_path_factory.mktemp("teacher") / "teacher", "vqa")


@pytest.fixture(scope="module")
def teacher_onnx(tiny_teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("teacher-onnx") / "teacher.onnx"
    assert main(["--teacher", str(tiny_teacher), "--out", str(out), "--eval-size", "200"]) == 0
    return out


def test_teacher_graph_has_dynamic_axes_and_fp32_parity(teacher_onnx: Path) -> None:
    def dims(value_info) -> list:
        return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]

    model = onnx.load(str(teacher_onnx))
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask", "pixel_values"]
    assert [dims(i) for i in model.graph.input] == [["batch", "seq"], ["batch", "seq"], ["batch", 3, 32, 32]]
    assert dims(model.graph.output[0]) == ["batch", 13]
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == OPSET
    meta = read_metadata(teacher_onnx)
    assert (meta["kind"], meta["task"], meta["precision"], meta["max_text_len"]) == ("teacher", "vqa", "fp32", 16)
    parity = meta["parity"]["fp32"]
    assert {k for k in parity if k.startswith("random")} == {"random_b1_l16", "random_b7_l16", "random_b64_l8"}
    assert parity["real"]["source"] == "easy-vqa test[:200]" and parity["real"]["examples"] == 200
    for stats in parity.values():
        assert stats["max_abs_logit_diff"] <= PARITY_TOL and stats["argmax_agreement"] == 1.0
    assert parity["real"]["accuracy"] == parity["real"]["reference_accuracy"]


def test_teacher_graph_answers_as_torch_at_other_lengths(tiny_teacher: Path, teacher_onnx: Path) -> None:
    """A batch of 3 with 5 tokens, through the graph and through Teacher.forward (HF's visual_embed)."""
    from training.teacher import load_teacher

    teacher = load_teacher(tiny_teacher)
    s = onnx_export.random_sample(teacher.config.vocab_size, 32, False, 3, 5, seed=7)
    session = ort.InferenceSession(str(teacher_onnx), providers=["CPUExecutionProvider"])
    feed = {"input_ids": s.input_ids, "attention_mask": s.attention_mask, "pixel_values": s.pixels}
    got = session.run(["logits"], feed)[0]
    assert got.shape == (3, 13)
    assert np.abs(got - torch_teacher_logits(teacher, s)).max() <= PARITY_TOL


def test_int8_teacher_records_agreement_and_accuracy(tiny_teacher: Path, teacher_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "teacher-int8.onnx"
    assert main(["--teacher", str(tiny_teacher), "--out", str(out), "--int8", "--eval-size", "200"]) == 0
    meta = read_metadata(out)
    stats = meta["parity"]["int8"]
    assert meta["precision"] == "int8" and meta["parity"]["fp32"]["real"]["argmax_agreement"] == 1.0
    assert stats["reference"] == "fp32 onnx" and stats["source"] == "easy-vqa test[:200]"
    assert 0.8 <= stats["argmax_agreement"] <= 1.0 and 0 < stats["max_abs_logit_diff"] < 0.5
    assert stats["accuracy_delta"] == pytest.approx(stats["accuracy"] - stats["reference_accuracy"])
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeLinear" in ops
    assert out.stat().st_size < teacher_onnx.stat().st_size


def test_reasoning_teacher_takes_two_stacked_images(tmp_path: Path) -> None:
    teacher = make_tiny_teacher(tmp_path / "teacher", "reasoning")
    out = tmp_path / "teacher.onnx"
    assert main(["--teacher", str(teacher), "--out", str(out), "--eval-size", "16"]) == 0
    model = onnx.load(str(out))
    dims = [d.dim_param or d.dim_value for d in model.graph.input[2].type.tensor_type.shape.dim]
    assert dims == ["batch", 2, 3, 32, 32]
    real = read_metadata(out)["parity"]["fp32"]["real"]
    assert real["source"].startswith("scenes") and real["argmax_agreement"] == 1.0


def test_failed_teacher_parity_fails_loudly_and_writes_nothing(
    tiny_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(onnx_export, "PARITY_TOL", 0.0)  # the graph differs from torch by ~1e-8 here
    out = tmp_path / "teacher.onnx"
    with caplog.at_level(logging.ERROR):
        assert main(["--teacher", str(tiny_teacher), "--out", str(out), "--eval-size", "8"]) == 1
    assert "fp32 parity failed on random" in caplog.text
    assert list(tmp_path.iterdir()) == []  # no file and no temp directory left behind


def test_teacher_has_no_fp16_graph(tiny_teacher: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        assert main(["--teacher", str(tiny_teacher), "--out", str(tmp_path / "t.onnx"), "--fp16"]) == 1
    assert "fp32 or int8" in caplog.text
