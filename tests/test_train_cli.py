"""`dide-train` end to end through main([...]): teacher, distill, eval, resume, HF checkpoints, torchrun."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertTokenizerFast, ViltConfig, ViltForImagesAndTextClassification, ViltForQuestionAnswering

from training.scene_language import VQA_LABELS
from training.student import load_student
from training.train import main

SCENES = "scenes:train=24,test=12,seed=3"
FAST = ["--epochs", "1", "--batch-size", "8", "--log-every", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def vqa_teacher(tmp_path_factory, monkeypatch_module):
    out = tmp_path_factory.mktemp("runs") / "teacher"
    assert main(["teacher", "--task", "vqa", "--data", SCENES, "--size", "tiny", "--out", str(out), *FAST]) == 0
    return out


@pytest.fixture(scope="module")
def monkeypatch_module(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("DIDE_DATA_DIR", str(tmp_path_factory.mktemp("data")))
    yield mp
    mp.undo()


def run_eval(capsys, model_dir) -> dict:
    capsys.readouterr()
    assert main(["eval", "--model", str(model_dir)]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_teacher_distill_eval(vqa_teacher, tmp_path, capsys):
    assert {"config.json", "model.safetensors", "tokenizer.json", "dide.json"} <= {
        p.name for p in vqa_teacher.iterdir()
    }
    result = run_eval(capsys, vqa_teacher)
    assert result["n"] > 0 and 0.0 <= result["accuracy"] <= 1.0 and result["task"] == "vqa"

    student_dir = tmp_path / "student"
    argv = ["distill", "--task", "vqa", "--teacher", str(vqa_teacher), "--out", str(student_dir), *FAST]
    assert main(argv) == 0
    loaded = load_student(student_dir)
    assert loaded.model.config.hidden_size == 32 and loaded.data == SCENES
    result = run_eval(capsys, student_dir)
    assert result["n"] == run_eval(capsys, vqa_teacher)["n"]
    assert not (tmp_path / "student.resume").exists()  # resume state is removed after a finished run


@pytest.mark.parametrize(
    "flags",
    [["--w-pred", "0", "--w-attn", "0", "--w-gt", "1"], ["--w-attn", "0"], ["--no-i2t"], ["--blind", "image"]],
)
def test_ablation_flags_run(vqa_teacher, tmp_path, flags):
    out = tmp_path / "s"
    argv = ["distill", "--task", "vqa", "--teacher", str(vqa_teacher), "--out", str(out), *FAST, *flags]
    assert main(argv) == 0
    assert json.loads((out / "config.json").read_text())["loss_weights"]["i2t"] == ("--no-i2t" not in flags)


def test_resume_after_interruption(vqa_teacher, tmp_path, caplog, monkeypatch):
    out = tmp_path / "s"
    argv = ["distill", "--task", "vqa", "--teacher", str(vqa_teacher), "--out", str(out), *FAST]
    argv[argv.index("--epochs") + 1] = "2"

    def interrupt(*args, **kwargs):  # the kill arrives after epoch 1's resume state is committed
        raise KeyboardInterrupt

    monkeypatch.setattr("training.loop.evaluate_dir", interrupt)
    with pytest.raises(KeyboardInterrupt):
        main([*argv, "--eval-every", "1"])
    resume = tmp_path / "s.resume"
    state = json.loads((resume / "state.json").read_text())
    assert state["epoch"] == 1 and state["step"] > 0
    changed = [*argv, "--batch-size", "4"]
    assert main(changed) == 2  # other settings: refused, not silently mixed
    with caplog.at_level(logging.INFO, logger="training.loop"):
        assert main(argv) == 0
    assert f"resuming from {resume} at epoch 1, step {state['step']}" in caplog.text
    assert not resume.exists()
    assert load_student(out).model.config.task == "vqa"
    uninterrupted = tmp_path / "u"
    assert main([str(uninterrupted) if a == str(out) else a for a in argv]) == 0
    weights = (out / "model.safetensors").read_bytes()
    assert weights == (uninterrupted / "model.safetensors").read_bytes()  # the same shuffles and augmentations


def test_evaluating_during_training_does_not_change_it(vqa_teacher, tmp_path):
    argv = ["distill", "--task", "vqa", "--teacher", str(vqa_teacher), *FAST]
    argv[argv.index("--epochs") + 1] = "2"  # evaluated after epoch 1 (default shift augmentation, dropout 0.1)
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert main([*argv, "--out", str(tmp_path / "b"), "--eval-every", "1"]) == 0
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_the_teacher_cache_changes_the_time_not_the_student(vqa_teacher, tmp_path, caplog):
    argv = ["distill", "--task", "vqa", "--teacher", str(vqa_teacher), *FAST, "--augment", "none"]
    argv[argv.index("--epochs") + 1] = "3"  # epochs 2 and 3 take the teacher's outputs from the cache
    with caplog.at_level(logging.INFO, logger="training.steps"):
        assert main([*argv, "--out", str(tmp_path / "cached")]) == 0
    assert "teacher cache: " in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="training.steps"):
        assert main([*argv, "--out", str(tmp_path / "asked"), "--teacher-cache-gib", "0"]) == 0
    assert "teacher cache" not in caplog.text
    weights = (tmp_path / "cached" / "model.safetensors").read_bytes()
    assert weights == (tmp_path / "asked" / "model.safetensors").read_bytes()  # the teacher draws no random numbers


def test_patience_stops_when_accuracy_stops_improving_and_keeps_the_best(vqa_teacher, tmp_path, monkeypatch, capsys):
    out = tmp_path / "s"
    argv = ["distill", "--task", "vqa", "--teacher", str(vqa_teacher), "--out", str(out), *FAST]
    argv[argv.index("--epochs") + 1] = "6"
    assert main([*argv, "--patience", "2"]) == 2
    assert "--patience needs --eval-every" in capsys.readouterr().err
    assert main([*argv, "--eval-every", "1", "--patience", "-1"]) == 2
    assert "--patience must be 0 (off) or a number of evaluations, got -1" in capsys.readouterr().err
    # Best after epoch 2; killed during epoch 3's evaluation; then two evaluations below the best.
    scripted = iter([0.5, 0.7, KeyboardInterrupt, 0.6, 0.65, 0.9])
    weights = []

    def evaluate(model_dir, limit):  # the saved model's weights at each evaluation, and a scripted accuracy
        weights.append((Path(model_dir) / "model.safetensors").read_bytes())
        accuracy = next(scripted)
        if accuracy is KeyboardInterrupt:
            raise KeyboardInterrupt
        return {"accuracy": accuracy, "n": limit}

    monkeypatch.setattr("training.loop.evaluate_dir", evaluate)
    with pytest.raises(KeyboardInterrupt):
        main([*argv, "--eval-every", "1", "--patience", "2"])
    assert main([*argv, "--eval-every", "1", "--patience", "2"]) == 0  # resumes after epoch 3, still counting
    assert len(weights) == 5  # stopped after epoch 5 of at most 6: the best so far survived the kill
    assert (out / "model.safetensors").read_bytes() == weights[1] != weights[4]  # epoch 2's model kept
    kept = json.loads((tmp_path / "s.stopping.json").read_text())
    assert kept["epoch"] == 2 and kept["accuracy"] == 0.7 and kept["epochs_run"] == 5 and kept["patience"] == 2
    assert 0 < kept["step"] < kept["steps_run"]
    assert not (tmp_path / "s.best").exists() and not (tmp_path / "s.resume").exists()
    assert load_student(out).model.config.task == "vqa"
    argv[argv.index("--epochs") + 1] = "1"
    assert main(argv) == 0  # a run without --patience: the earlier run's record no longer applies
    assert not (tmp_path / "s.stopping.json").exists()


def test_patience_waits_while_the_student_is_at_chance(vqa_teacher, tmp_path, monkeypatch):
    """Evaluations at chance (within 2 points of always giving the most frequent answer) do not count: a student
    that sits at chance before it learns is not stopped there."""
    out = tmp_path / "s"
    argv = ["distill", "--task", "vqa", "--teacher", str(vqa_teacher), "--out", str(out), *FAST]
    argv[argv.index("--epochs") + 1] = "6"
    scripted = iter([0.5, 0.51, 0.49, 0.515, 0.8, 0.7])
    monkeypatch.setattr(
        "training.loop.evaluate_dir", lambda model_dir, limit: {"accuracy": next(scripted), "majority": 0.5}
    )
    assert main([*argv, "--eval-every", "1", "--patience", "2"]) == 0
    kept = json.loads((tmp_path / "s.stopping.json").read_text())
    assert (kept["epoch"], kept["accuracy"], kept["epochs_run"], kept["majority"]) == (5, 0.8, 6, 0.5)
    assert kept["chance_margin"] == 0.02


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    assert main(["teacher", "--task", "entailment", "--data", "easy-vqa", "--out", str(tmp_path / "t")]) == 2
    assert "easy-vqa" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "missing")]) == 2
    assert str(tmp_path / "missing") in capsys.readouterr().err
    argv = ["distill", "--task", "vqa", "--teacher", str(tmp_path / "t"), "--out", str(tmp_path / "s")]
    assert main([*argv, "--teacher-cache-gib", "-1"]) == 2
    assert "--teacher-cache-gib must be 0 (off) or a size in GiB, got -1.0" in capsys.readouterr().err


def save_hf_tokenizer(directory: Path) -> None:
    words = sorted({w for label in VQA_LABELS for w in label.split()} | {"what", "color", "shape", "is", "the", "of"})
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, "?", "left", "right"]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(directory)


def test_hf_vilt_checkpoints_work_as_teachers(tmp_path, monkeypatch_module, capsys):
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=64,
                  patch_size=16, max_position_embeddings=16, vocab_size=64)  # fmt: skip
    qa_dir = tmp_path / "hf-vqa"
    labels = list(VQA_LABELS)
    ViltForQuestionAnswering(
        ViltConfig(**common, num_labels=len(labels), id2label=dict(enumerate(labels)))
    ).save_pretrained(qa_dir)
    save_hf_tokenizer(qa_dir)
    out = tmp_path / "s-vqa"
    assert main(["distill", "--task", "vqa", "--data", SCENES, "--teacher", str(qa_dir), "--out", str(out), *FAST]) == 0
    assert load_student(out).labels == labels

    nlvr_dir = tmp_path / "hf-nlvr2"
    ViltForImagesAndTextClassification(
        ViltConfig(**common, num_images=2, modality_type_vocab_size=3, num_labels=2)
    ).save_pretrained(nlvr_dir)
    save_hf_tokenizer(nlvr_dir)
    out = tmp_path / "s-nlvr2"
    argv = ["distill", "--task", "reasoning", "--data", SCENES, "--teacher", str(nlvr_dir), "--out", str(out), *FAST]
    assert main(argv) == 0
    assert load_student(out).labels == ["False", "True"]
    assert run_eval(capsys, out)["task"] == "reasoning"


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(vqa_teacher, tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [torchrun, "--nproc_per_node", "2", "-m", "training.train", "distill", "--task", "vqa", "--teacher",
            str(vqa_teacher), "--out", str(out), *FAST]  # fmt: skip
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_student(out).model.config.task == "vqa"
    assert torch.isfinite(next(iter(load_student(out).model.parameters()))).all()
