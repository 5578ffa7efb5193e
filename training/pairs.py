"""Image-caption pairs for image-text matching: COCO captions JSON, and tab- or JSON-lines pair files."""

from __future__ import annotations

import logging
import random
from pathlib import Path

from training.annotations import AnnotationError, get_field, read_jsonl, read_record_lists, require_image
from training.examples import ITM_LABELS, PairExample, TaskData

logger = logging.getLogger(__name__)

COCO_LAYOUT = """\
    CAPTIONS_JSON   (e.g. annotations/captions_train2014.json) {"images": [{"id", "file_name"}],
                      "annotations": [{"image_id", "caption"}]}
    DIR/COCO_train2014_000000057870.jpg   (file_name, under images=DIR or the JSON's directory)"""
PAIR_FILE_FORMS = """\
    FILE.tsv     one pair a line: image_path<TAB>caption
    FILE.jsonl   one JSON object a line: {"image": ..., "caption": ..., "negatives": [...] (optional)}
    (image paths relative to the file's directory)"""

# Neither format has a test split: a seeded ~5% of the images (with all their captions) is held out.
TEST_FRACTION = 0.05
TEST_SEED = 0


def _caption(text: str) -> str:
    return " ".join(text.split())  # COCO captions carry stray newlines and trailing spaces


def load_coco(captions: str | Path, images: str | Path | None = None) -> TaskData:
    """COCO captions (e.g. captions_train2014.json); each caption of an image is one pair."""
    path = Path(captions)
    if not path.is_file():
        raise AnnotationError(f"{path} not found; expected:\n{COCO_LAYOUT}")
    root = Path(images) if images is not None else path.parent
    image_records, annotations = read_record_lists(path, "images", "annotations")
    files: dict[int, tuple[Path, str]] = {}
    for i, record in enumerate(image_records):
        where = f"{path}: images[{i}]"
        files[get_field(record, "id", where, int)] = (root / get_field(record, "file_name", where), where)
    found: dict[int, Path] = {}
    pairs = []
    for i, record in enumerate(annotations):
        where = f"{path}: annotations[{i}]"
        image_id = get_field(record, "image_id", where, int)
        caption = _caption(get_field(record, "caption", where))
        if image_id not in files:
            raise AnnotationError(f"{where}: image_id {image_id} is not in the file's 'images'")
        if image_id not in found:
            found[image_id] = require_image(*files[image_id])
        pairs.append(PairExample(found[image_id], caption))
    return hold_out_images(pairs, "coco", {"captions": str(path), "images": str(root)})


def load_pair_file(file: str | Path) -> TaskData:
    """Pairs from a .tsv (image_path<TAB>caption) or .jsonl ({"image", "caption"}) file."""
    path = Path(file)
    if path.suffix not in (".tsv", ".jsonl"):
        raise AnnotationError(f"{path}: a pairs file must end in .tsv or .jsonl:\n{PAIR_FILE_FORMS}")
    if not path.is_file():
        raise AnnotationError(f"{path} not found; expected:\n{PAIR_FILE_FORMS}")
    pairs = []
    for where, image, caption, negatives in _tsv(path) if path.suffix == ".tsv" else _jsonl(path):
        pairs.append(PairExample(require_image(path.parent / image, where), _caption(caption), negatives))
    return hold_out_images(pairs, "pairs", {"file": str(path)})


def _tsv(path: Path):
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            fields = line.rstrip("\r\n").split("\t")
            where = f"{path}:{lineno}"
            if len(fields) != 2 or not all(x.strip() for x in fields):
                raise AnnotationError(f"{where}: expected image_path<TAB>caption, got {line.strip()!r}")
            yield where, fields[0].strip(), fields[1], ()


def _jsonl(path: Path):
    for where, record in read_jsonl(path):
        negatives = record.get("negatives", [])
        if not isinstance(negatives, list) or not all(isinstance(n, str) and n.strip() for n in negatives):
            raise AnnotationError(f"{where}: field 'negatives' must be a list of captions, got {negatives!r}")
        caption = get_field(record, "caption", where)
        yield where, get_field(record, "image", where), caption, tuple(_caption(n) for n in negatives)


def hold_out_images(pairs: list[PairExample], name: str, meta: dict) -> TaskData:
    """Train on most images and test on a seeded TEST_FRACTION of them; an image's pairs stay together."""
    images = sorted({p.image for p in pairs})
    if len(images) < 2:
        raise AnnotationError(f"{name}: {len(images)} image(s); a train and a test split need at least 2")
    random.Random(TEST_SEED).shuffle(images)
    test_images = set(images[: max(1, round(TEST_FRACTION * len(images)))])
    train = [p for p in pairs if p.image not in test_images]
    test = [p for p in pairs if p.image in test_images]
    logger.info("%s: %d train / %d test pairs (%d test images held out)", name, len(train), len(test), len(test_images))
    return TaskData(
        task="itm",
        labels=list(ITM_LABELS),
        train=train,
        test=test,
        name=name,
        meta={**meta, "test_images": len(test_images)},
    )
