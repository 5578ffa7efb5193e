"""NLVR2 (two images, one statement, true or false) in its released JSON-lines format."""

from __future__ import annotations

from pathlib import Path

from training.annotations import AnnotationError, get_field, load_splits, read_jsonl, require_file, require_image
from training.examples import REASONING_LABELS, ReasoningExample, TaskData

# The example "train-10171-0-0" shows the images "train-10171-0-img0.png" and "...-img1.png": the
# identifier without its last "-N" (which numbers the sentences written for one image pair).
LAYOUT = """\
    DIR/train.json   one JSON object a line: {"identifier": "train-10171-0-0", "sentence": "...",
    DIR/dev.json       "label": "True" or "False", "directory": 29 (train only), ...}
    DIR/test1.json
    DIR/images/train/29/train-10171-0-img0.png, DIR/images/train/29/train-10171-0-img1.png
    DIR/dev/dev-850-0-img0.png, DIR/dev/dev-850-0-img1.png
    DIR/test1/test1-0-1-img0.png, DIR/test1/test1-0-1-img1.png"""

SPLITS = ("train", "dev", "test1")
LABELS = {"True": True, "False": False}


def read_split(root: Path, split: str) -> list[ReasoningExample]:
    """One split; errors name the file and line of the bad record."""
    path = require_file(root / f"{split}.json", LAYOUT)
    examples = []
    for where, record in read_jsonl(path):
        identifier = get_field(record, "identifier", where)
        statement = get_field(record, "sentence", where)
        label = get_field(record, "label", where)
        if label not in LABELS:
            raise AnnotationError(f"{where}: bad label {label!r}; expected 'True' or 'False'")
        pair, dash, _ = identifier.rpartition("-")
        if not dash or not pair:
            raise AnnotationError(f"{where}: bad identifier {identifier!r}; expected e.g. 'train-10171-0-0'")
        if split == "train":
            folder = root / "images" / "train" / str(get_field(record, "directory", where, (int, str)))
        else:
            folder = root / split
        images = tuple(require_image(folder / f"{pair}-img{i}.png", where) for i in (0, 1))
        examples.append(ReasoningExample(images, statement, LABELS[label]))
    return examples


def load_nlvr2(root: str | Path, *, test_split: str = "test1") -> TaskData:
    """NLVR2 train and `test_split` ("dev" or "test1")."""
    return load_splits(read_split, root, test_split, SPLITS[1:], "NLVR2", "nlvr2", "reasoning", REASONING_LABELS)
