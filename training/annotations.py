"""Reading the real datasets' annotation files, with errors that name the file and the record."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from training.examples import Example, TaskData

logger = logging.getLogger(__name__)


class AnnotationError(ValueError):
    """An annotation file is missing or malformed, or a record points at a missing image."""


def require_file(path: Path, layout: str) -> Path:
    """`path` if it is a file; otherwise an error that shows the expected directory layout."""
    if not path.is_file():
        raise AnnotationError(f"{path} not found; expected layout:\n{layout}")
    return path


def read_json(path: Path) -> Any:
    """One JSON document; bad JSON is reported with its line and column."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path}:{e.lineno}: bad JSON: {e.msg} (column {e.colno})") from None


def read_record_lists(path: Path, *keys: str) -> list[list[dict]]:
    """The lists of JSON objects under `keys` of one JSON document (e.g. COCO's "images" and "annotations")."""
    data = read_json(path)
    lists = []
    for key in keys:
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise AnnotationError(f"{path}: expected a JSON object with a list under {key!r}")
        for i, record in enumerate(data[key]):
            if not isinstance(record, dict):
                raise AnnotationError(f"{path}: {key}[{i}] is not a JSON object")
        lists.append(data[key])
    return lists


def read_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    """("FILE:LINE", record) for each non-blank line of a JSON-lines file."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise AnnotationError(f"{where}: bad JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(record, dict):
                raise AnnotationError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield where, record


def get_field(record: dict, name: str, where: str, kind: type | tuple[type, ...] = str) -> Any:
    """record[name], which must exist, be of `kind` and (for strings) not be blank."""
    if name not in record:
        raise AnnotationError(f"{where}: missing field {name!r}")
    value = record[name]
    if isinstance(value, bool) or not isinstance(value, kind) or (isinstance(value, str) and not value.strip()):
        raise AnnotationError(f"{where}: field {name!r} has a bad value {value!r}")
    return value


def require_image(path: Path, where: str) -> Path:
    if not path.is_file():
        raise AnnotationError(f"{where}: image file {path} not found")
    return path


def load_splits(
    read_split: Callable[[Path, str], list[Example]],
    root: str | Path,
    test_split: str,
    test_splits: Sequence[str],
    title: str,
    name: str,
    task: str,
    labels: Sequence[str],
) -> TaskData:
    """A dataset's train split and `test_split` (one of `test_splits`), as read_split(root, split) reads them;
    `title` names the dataset in messages, `name` in its TaskData."""
    if test_split not in test_splits:
        raise ValueError(f"bad {title} test split {test_split!r}: use {' or '.join(map(repr, test_splits))}")
    root = Path(root)
    train, test = read_split(root, "train"), read_split(root, test_split)
    logger.info("%s: %d train / %d %s examples", title, len(train), len(test), test_split)
    return TaskData(task=task, labels=list(labels), train=train, test=test, name=name, meta={"test_split": test_split})
