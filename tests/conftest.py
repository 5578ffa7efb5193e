"""Shared fixtures: tiny random students saved as checkpoints and exported as ONNX bundles, one per task."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

EASY_VQA_SENTENCES = [
    "what shape is in the image?",
    "what color is the shape?",
    "is there a red circle in the image?",
    "does the image contain a blue triangle?",
    "is there a green rectangle?",
    "what is the color of the shape?",
    "is no yellow shape present?",
    "the circle is left of the square.",
    "there are two blue triangles.",
]


def make_tiny_student(directory: Path, task: str, seed: int = 0, fusion: str = "concat") -> Path:
    """Save a tiny random student for `task` (D=32, 2 layers, 32x32 images) with a small WordPiece tokenizer."""
    from dataclasses import replace

    import torch

    from core.preprocess import ImageSpec
    from training.examples import ENTAILMENT_LABELS, REASONING_LABELS
    from training.student import DualEncoderStudent, save_student, tiny_config
    from training.tokenizer import train_wordpiece

    if task == "vqa":
        import easy_vqa

        labels, data = sorted(easy_vqa.get_answers()), "easy-vqa"
    else:
        labels = list(ENTAILMENT_LABELS if task == "entailment" else REASONING_LABELS)
        data = "scenes:train=4,test=32,seed=0"  # a few rendered scenes: cheap real inputs
    tokenizer = train_wordpiece(EASY_VQA_SENTENCES, vocab_size=200)
    torch.manual_seed(seed)
    model = DualEncoderStudent(replace(tiny_config(task, len(labels), tokenizer.get_vocab_size()), fusion=fusion))
    save_student(model.eval(), directory, labels=labels, tokenizer=tokenizer, image_spec=ImageSpec(size=32), data=data)
    return directory


@pytest.fixture(scope="session")
def tiny_student_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """task -> a tiny student checkpoint directory (made once per session and task)."""
    made: dict[str, Path] = {}

    def get(task: str) -> Path:
        if task not in made:
            made[task] = make_tiny_student(tmp_path_factory.mktemp(f"student-{task}") / "student", task)
        return made[task]

    return get


@pytest.fixture(scope="session")
def tiny_bundle_factory(
    tiny_student_factory: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], Path]:
    """task -> that task's tiny student exported as an fp32 bundle (made once per session and task).

    The vqa bundle's parity is checked on 1,000 easy-VQA test questions; the others on 64 examples.
    """
    from export.onnx_export import ExportOptions, export_bundle

    made: dict[str, Path] = {}

    def get(task: str) -> Path:
        if task not in made:
            out = tmp_path_factory.mktemp(f"bundle-{task}") / "bundle"
            export_bundle(tiny_student_factory(task), out, ExportOptions(eval_size=1000 if task == "vqa" else 64))
            made[task] = out
        return made[task]

    return get


@pytest.fixture(scope="session")
def tiny_student_dir(tiny_student_factory: Callable[[str], Path]) -> Path:
    """A tiny random VQA student checkpoint (easy-VQA labels, data "easy-vqa")."""
    return tiny_student_factory("vqa")


@pytest.fixture(scope="session")
def tiny_bundle(tiny_bundle_factory: Callable[[str], Path]) -> Path:
    """The tiny VQA student exported as an fp32 bundle."""
    return tiny_bundle_factory("vqa")
