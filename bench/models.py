"""The benchmarks' models: random-weight teachers of the named sizes, their students, and their ONNX graphs."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import easy_vqa
import numpy as np
import torch

from core.atomic import atomic_directory
from core.bundle import GRAPHS, write_manifest, write_metadata
from core.preprocess import ImageSpec, TextEncoder, load_image
from export.onnx_export import base_manifest, export_graphs, quantize_int8
from export.teacher_export import export_teacher_graph, quantize_teacher_int8
from training.student import DualEncoderStudent
from training.teacher import SIZES, Teacher, build_teacher, student_from_teacher
from training.tokenizer import train_wordpiece

log = logging.getLogger(__name__)

MAX_TEXT_LEN = 16  # the project's default text length (build_teacher); texts are padded to it
SHALLOW_TEXT_LAYERS = 2  # the "shallower text tower" variant: first layer + last layer of the teacher
TOKENS = (6, 14)  # a real easy-VQA question with this many tokens, [CLS] and [SEP] included
STAMP = "bench.json"


@dataclass
class Request:
    """The one request every variant answers: a real easy-VQA question and its image."""

    question: str
    tokens: int  # real tokens ([CLS] and [SEP] included); the ids are padded to MAX_TEXT_LEN
    image: Path
    input_ids: np.ndarray  # (1, L) int64
    attention_mask: np.ndarray  # (1, L) int64
    pixels: np.ndarray  # (1, 3, S, S) float32, preprocessed

    def batch(self, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The request repeated b times: (input_ids, attention_mask, pixels)."""
        return (
            np.repeat(self.input_ids, b, 0),
            np.repeat(self.attention_mask, b, 0),
            np.ascontiguousarray(np.repeat(self.pixels, b, 0)),
        )


@dataclass
class Models:
    """A random-weight teacher of one named size and two students made from its weights."""

    size: str
    teacher: Teacher
    student: DualEncoderStudent  # text tower as deep as the teacher
    shallow: DualEncoderStudent  # text tower of SHALLOW_TEXT_LAYERS layers
    text: TextEncoder
    labels: list[str]


def tokenizer_and_labels() -> tuple[TextEncoder, list[str]]:
    """A WordPiece tokenizer trained on easy-VQA's training questions, and easy-VQA's answers."""
    questions = easy_vqa.get_train_questions()[0]
    return TextEncoder(train_wordpiece(questions, 1000), MAX_TEXT_LEN), sorted(easy_vqa.get_answers())


def real_request(text: TextEncoder, image_size: int) -> Request:
    """The first easy-VQA test question of 6-14 tokens, with its image at the model's input size."""
    questions, _, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    for question, image_id in zip(questions, image_ids, strict=True):
        ids, mask = text([question])
        n = int(mask.sum())
        if TOKENS[0] <= n <= TOKENS[1]:
            pixels = load_image(paths[image_id], ImageSpec(size=image_size))[None]
            return Request(question, n, Path(paths[image_id]), ids, mask, pixels)
    raise RuntimeError(f"no easy-VQA test question has {TOKENS[0]}-{TOKENS[1]} tokens")


def build_models(size: str, seed: int = 0) -> Models:
    """Teacher of `size` (training.teacher.SIZES) and its deep and shallow students, all in eval mode."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
    text, labels = tokenizer_and_labels()
    torch.manual_seed(seed)
    teacher = build_teacher(size, "vqa", labels, text.tokenizer, "easy-vqa", dropout=0.0, max_text_len=MAX_TEXT_LEN)
    teacher.model.eval()
    student = student_from_teacher(teacher).eval()
    shallow = student_from_teacher(teacher, text_layers=SHALLOW_TEXT_LAYERS).eval()
    return Models(size, teacher, student, shallow, text, labels)


def write_bundle(
    model: DualEncoderStudent,
    directory: Path,
    text: TextEncoder,
    labels: list[str],
    precision: str,
    graphs_from: Path | None = None,
) -> Path:
    """An fp32 or int8 bundle of `model`, written with export.onnx_export's functions, reused if already there.

    `graphs_from`: an fp32 bundle of the same model whose graphs are copied instead of exported again.
    The parity checks of `dide-export` are skipped (they run the model hundreds of times, minutes at the
    base size here); the benchmarks record each bundle's logit difference from torch on their own request.
    """
    if precision not in ("fp32", "int8"):
        raise ValueError(f"precision must be fp32 or int8, got {precision!r}")
    stamp = {"config": asdict(model.config), "precision": precision, "torch": torch.__version__}
    stamp_path = directory / STAMP
    if stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
        return directory
    spec = ImageSpec(size=model.config.image_size)

    def write(tmp: Path) -> None:
        if graphs_from is None:
            export_graphs(model, tmp)
        else:
            for name in GRAPHS:
                shutil.copyfile(graphs_from / name, tmp / name)
        write_metadata(
            tmp,
            tokenizer_json=text.tokenizer.to_str(),
            image_spec=spec,
            max_text_len=model.config.max_text_len,
            labels=labels,
        )
        if precision == "int8":
            quantize_int8(tmp)
        source = {"checkpoint": "random weights (benchmark)"}
        write_manifest(tmp, {**base_manifest(model, spec, precision), "source": source})
        (tmp / STAMP).write_text(json.dumps(stamp))  # last, so a half-written bundle is never reused

    log.info("exporting %s bundle to %s", precision, directory)
    atomic_directory(directory, write)
    return directory


def bundles(models: Models, work: Path) -> dict[tuple[str, str], Path]:
    """(student kind, precision) -> bundle directory, for "deep"/"shallow" x "fp32"/"int8"."""
    out = {}
    for kind, model in (("deep", models.student), ("shallow", models.shallow)):
        fp32 = write_bundle(model, work / models.size / f"{kind}-fp32", models.text, models.labels, "fp32")
        int8 = work / models.size / f"{kind}-int8"
        out[kind, "fp32"] = fp32
        out[kind, "int8"] = write_bundle(model, int8, models.text, models.labels, "int8", graphs_from=fp32)
    return out


def teacher_graphs(models: Models, work: Path) -> dict[str, Path]:
    """precision -> the teacher as one ONNX graph, "fp32" and "int8" (ONNX Runtime dynamic: every weight MatMul and
    the patch Conv), written with export.teacher_export's functions and reused if already there.

    As for the bundles, dide-export's parity checks are skipped; the benchmarks record each graph's logit
    difference from the torch teacher on their own request.
    """
    directory = work / models.size / "teacher"
    paths = {"fp32": directory / "teacher-fp32.onnx", "int8": directory / "teacher-int8.onnx"}
    stamp = {"config": json.loads(models.teacher.config.to_json_string()), "torch": torch.__version__}
    stamp_path = directory / STAMP
    if stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
        return paths

    def write(tmp: Path) -> None:
        export_teacher_graph(models.teacher, tmp / paths["fp32"].name)
        quantize_teacher_int8(tmp / paths["fp32"].name, tmp / paths["int8"].name)
        (tmp / STAMP).write_text(json.dumps(stamp))  # last, so half-written graphs are never reused

    log.info("exporting the %s teacher (fp32 and int8) to %s", models.size, directory)
    atomic_directory(directory, write)
    return paths
