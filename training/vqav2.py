"""VQAv2 in its official format (questions + annotations JSON, COCO images), and the VQA score."""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from training.annotations import AnnotationError, get_field, read_record_lists, require_file, require_image
from training.examples import TaskData, VQAExample

logger = logging.getLogger(__name__)

# The official file names; training uses train2014 and testing val2014 (test-dev answers are not public).
LAYOUT = """\
    DIR/v2_OpenEnded_mscoco_train2014_questions.json  {"questions": [{"image_id", "question", "question_id"}]}
    DIR/v2_mscoco_train2014_annotations.json          {"annotations": [{"question_id", "image_id",
                                                        "answers": [{"answer": ...}] x10, "multiple_choice_answer"}]}
    DIR/v2_OpenEnded_mscoco_val2014_questions.json
    DIR/v2_mscoco_val2014_annotations.json
    DIR/train2014/COCO_train2014_000000000009.jpg     (the image id as %012d)
    DIR/val2014/COCO_val2014_000000000042.jpg"""

# The answer normalisation of the official VQA evaluation (vqaEval.py), without its table of
# contraction spellings ("dont" -> "don't"): punctuation, periods, number words, articles.
_PUNCTUATION = [
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit ("2.5" keeps its period)
_DIGIT_COMMA = re.compile(r"\d,\d")
_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}


def normalize_answer(answer: str) -> str:
    """Lowercase; drop or space out punctuation as vqaEval does; drop periods not followed by a digit;
    number words to digits; drop articles; collapse whitespace."""
    original = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    drop_all = _DIGIT_COMMA.search(original) is not None
    text = original
    for p in _PUNCTUATION:
        # Punctuation next to a space (or any, in a text with a "1,000"-style number) is dropped;
        # otherwise, as inside "t-shirt", it becomes a space.
        drop = drop_all or f"{p} " in original or f" {p}" in original
        text = text.replace(p, "" if drop else " ")
    text = _PERIOD.sub("", text)
    words = [_NUMBERS.get(w, w) for w in text.split()]
    return " ".join(w for w in words if w not in _ARTICLES)


def soft_scores(answers: list[str]) -> dict[str, float]:
    """Each normalised human answer with its score min(#humans who gave it / 3, 1)."""
    counts = Counter(normalize_answer(a) for a in answers)
    return {a: min(n / 3, 1.0) for a, n in counts.items() if a}


def vqa_score(pred: str, answers: Mapping[str, float]) -> float:
    """The VQA accuracy of one predicted answer against an example's soft scores (VQAExample.answers).

    This is the min(#humans/3, 1) form; the official script also averages over the ten 9-of-10
    subsets of humans, which gives 0.3 / 0.6 / 0.9 instead of 1/3 / 2/3 / 1 for 1 / 2 / 3 matches."""
    return answers.get(normalize_answer(pred), 0.0)


def _read_split(root: Path, split: str) -> tuple[list[VQAExample], Counter]:
    """One split's examples and the counts of its normalised multiple-choice (majority) answers."""
    q_path = require_file(root / f"v2_OpenEnded_mscoco_{split}_questions.json", LAYOUT)
    a_path = require_file(root / f"v2_mscoco_{split}_annotations.json", LAYOUT)
    annotations: dict[int, dict] = {}
    for i, a in enumerate(read_record_lists(a_path, "annotations")[0]):
        where = f"{a_path}: annotations[{i}]"
        qid = get_field(a, "question_id", where, int)
        answers = get_field(a, "answers", where, list)
        if not answers:
            raise AnnotationError(f"{where}: field 'answers' is empty")
        texts = []
        for answer in answers:
            if not isinstance(answer, dict):
                raise AnnotationError(f"{where}: an entry of 'answers' is not an object: {answer!r}")
            texts.append(get_field(answer, "answer", where))
        majority = normalize_answer(get_field(a, "multiple_choice_answer", where))
        annotations[qid] = {"answers": soft_scores(texts), "majority": majority}

    examples = []
    majorities: Counter = Counter()
    seen_images: dict[int, Path] = {}
    for i, q in enumerate(read_record_lists(q_path, "questions")[0]):
        where = f"{q_path}: questions[{i}]"
        qid = get_field(q, "question_id", where, int)
        image_id = get_field(q, "image_id", where, int)
        question = get_field(q, "question", where)
        if qid not in annotations:
            raise AnnotationError(f"{where}: question_id {qid} has no entry in {a_path}")
        if image_id not in seen_images:
            image = root / split / f"COCO_{split}_{image_id:012d}.jpg"
            seen_images[image_id] = require_image(image, where)
        annotation = annotations[qid]
        examples.append(VQAExample(seen_images[image_id], question, annotation["answers"]))
        majorities[annotation["majority"]] += 1
    return examples, majorities


def load_vqav2(
    root: str | Path, *, min_answer_count: int = 9, train_split: str = "train2014", test_split: str = "val2014"
) -> TaskData:
    """VQAv2 with the answer vocabulary of training majority answers seen at least `min_answer_count`
    times (ViLT's 3,129 answers counted train + val at 9; train alone gives fewer). Training
    questions with no answer in the vocabulary are dropped; test questions are all kept."""
    root = Path(root)
    train, majorities = _read_split(root, train_split)
    test, _ = _read_split(root, test_split)
    labels = sorted((a for a, n in majorities.items() if n >= min_answer_count), key=lambda a: (-majorities[a], a))
    if not labels:
        raise AnnotationError(
            f"{root}: no training answer occurs {min_answer_count} or more times; lower min_answer_count"
        )
    vocabulary = set(labels)
    kept = [ex for ex in train if vocabulary.intersection(ex.answers)]
    logger.info(
        "VQAv2: %d answers; %d train questions (%d without an answer in the vocabulary dropped), %d test",
        len(labels), len(kept), len(train) - len(kept), len(test),
    )  # fmt: skip
    return TaskData(
        task="vqa",
        labels=labels,
        train=kept,
        test=test,
        name="vqav2",
        meta={"test_split": test_split, "min_answer_count": min_answer_count, "dropped_train": len(train) - len(kept)},
    )
