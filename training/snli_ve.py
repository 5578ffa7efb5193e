"""SNLI-VE (visual entailment) in its released JSON-lines format over Flickr30k images."""

from __future__ import annotations

from pathlib import Path

from training.annotations import AnnotationError, get_field, load_splits, read_jsonl, require_file, require_image
from training.examples import ENTAILMENT_LABELS, EntailmentExample, TaskData

LAYOUT = """\
    DIR/snli_ve_train.jsonl   one JSON object a line: {"Flickr30K_ID": "3416050480",
    DIR/snli_ve_dev.jsonl       "sentence2": "A man is sleeping.", "gold_label": "contradiction", ...}
    DIR/snli_ve_test.jsonl      (older releases spell the id field "Flikr30kID")
    DIR/flickr30k_images/3416050480.jpg"""

SPLITS = ("train", "dev", "test")
ID_FIELDS = ("Flickr30K_ID", "Flikr30kID")


def read_split(root: Path, split: str) -> list[EntailmentExample]:
    """One split; errors name the file and line of the bad record."""
    path = require_file(root / f"snli_ve_{split}.jsonl", LAYOUT)
    examples = []
    images: dict[str, Path] = {}
    for where, record in read_jsonl(path):
        id_field = next((f for f in ID_FIELDS if f in record), None)
        if id_field is None:
            raise AnnotationError(f"{where}: missing field {ID_FIELDS[0]!r} (or {ID_FIELDS[1]!r})")
        image_id = str(get_field(record, id_field, where, (str, int)))
        hypothesis = get_field(record, "sentence2", where)
        label = get_field(record, "gold_label", where)
        if label not in ENTAILMENT_LABELS:
            raise AnnotationError(f"{where}: bad gold_label {label!r}; expected one of {', '.join(ENTAILMENT_LABELS)}")
        if image_id not in images:
            images[image_id] = require_image(root / "flickr30k_images" / f"{image_id}.jpg", where)
        examples.append(EntailmentExample(images[image_id], hypothesis, label))
    return examples


def load_snli_ve(root: str | Path, *, test_split: str = "test") -> TaskData:
    """SNLI-VE train and `test_split` ("dev" or "test")."""
    return load_splits(read_split, root, test_split, SPLITS[1:], "SNLI-VE", "snli-ve", "entailment", ENTAILMENT_LABELS)
