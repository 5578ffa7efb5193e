"""Loaders for VQAv2, SNLI-VE and NLVR2 on small files in the exact released formats, and load_data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from core.preprocess import ImageSpec, load_image
from training.annotations import AnnotationError
from training.data import load_data
from training.examples import ENTAILMENT_LABELS, target_of
from training.nlvr2 import load_nlvr2
from training.snli_ve import load_snli_ve
from training.vqav2 import load_vqav2, normalize_answer, soft_scores, vqa_score

FIXTURES = Path(__file__).parent / "fixtures"

# The image files each fixture refers to, named as the real datasets name them.
IMAGES = {
    "vqav2": [
        "train2014/COCO_train2014_000000000009.jpg",
        "train2014/COCO_train2014_000000000025.jpg",
        "train2014/COCO_train2014_000000000030.jpg",
        "val2014/COCO_val2014_000000000042.jpg",
        "val2014/COCO_val2014_000000000073.jpg",
    ],
    "snli_ve": [
        "flickr30k_images/3416050480.jpg",
        "flickr30k_images/2267923837.jpg",
        "flickr30k_images/1000092795.jpg",
        "flickr30k_images/4726019778.jpg",
    ],
    "nlvr2": [
        "images/train/29/train-10171-0-img0.png",
        "images/train/29/train-10171-0-img1.png",
        "images/train/0/train-8253-2-img0.png",
        "images/train/0/train-8253-2-img1.png",
        "dev/dev-850-0-img0.png",
        "dev/dev-850-0-img1.png",
        "test1/test1-0-1-img0.png",
        "test1/test1-0-1-img1.png",
    ],
}


def dataset(name: str, tmp_path: Path) -> Path:
    """A copy of the fixture's annotation files plus tiny images at the paths the real data uses."""
    root = tmp_path / name
    shutil.copytree(FIXTURES / name, root)
    for i, relative in enumerate(IMAGES[name]):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (6, 4), (40 * i, 255 - 30 * i, 90)).save(root / relative)
    return root


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def edit_line(path: Path, lineno: int, edit) -> None:
    """Replace line `lineno` (1-based) by a raw string `edit`, or apply a callable `edit` to its record."""
    lines = path.read_text().splitlines()
    if isinstance(edit, str):
        lines[lineno - 1] = edit
    else:
        record = json.loads(lines[lineno - 1])
        edit(record)
        lines[lineno - 1] = json.dumps(record)
    path.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------------
# VQAv2


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("Two.", "2"),
        ("  YES!", "yes"),
        ("the Red bus", "red bus"),
        ("an umbrella", "umbrella"),
        ("t-shirt", "t shirt"),  # punctuation inside a word becomes a space
        ("black & white", "black & white"),
        ("yes, it is", "yes it is"),  # next to a space it is dropped
        ("1,000", "1000"),
        ("2.5", "2.5"),
        ("none", "0"),
        ("ten\tdogs", "10 dogs"),
    ],
)
def test_normalize_answer_follows_the_official_evaluation(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_soft_scores_and_vqa_score():
    scores = soft_scores(["1", "one", "2", "2", "two", "Two", "2", "2.", "two", "3"])
    assert scores == pytest.approx({"1": 2 / 3, "2": 1.0, "3": 1 / 3})
    assert vqa_score("Two", scores) == 1.0
    assert vqa_score("one", scores) == pytest.approx(2 / 3)
    assert vqa_score("3", scores) == pytest.approx(1 / 3)
    assert vqa_score("cat", scores) == 0.0


def test_vqav2_loads_questions_soft_scores_and_coco_images(tmp_path):
    root = dataset("vqav2", tmp_path)
    data = load_vqav2(root, min_answer_count=2)
    assert data.task == "vqa" and data.name == "vqav2"
    # majority answers in train: yes x10, "2" x2, "red" x2, umbrella x1 -> most frequent first
    assert data.labels == ["yes", "2", "red"]
    # "What is the man holding?" (umbrella / frisbee) has no answer in the vocabulary: dropped from train
    assert len(data.train) == 14 and data.meta["dropped_train"] == 1
    assert "What is the man holding?" not in {ex.question for ex in data.train}
    by_question = {ex.question: ex for ex in data.train}
    cats = by_question["How many cats are there?"]
    assert cats.image == root / "train2014/COCO_train2014_000000000009.jpg"
    assert cats.answers == pytest.approx({"2": 1.0, "3": 2 / 3})  # "2" x4 + "two" x3 + "Two." x1
    assert target_of(cats, data.labels) == pytest.approx([0.0, 1.0, 0.0])
    bus = by_question["What color is the bus?"]
    assert bus.answers == pytest.approx({"red": 1.0, "maroon": 1.0})
    assert target_of(bus, data.labels) == [0.0, 0.0, 1.0]
    assert by_question["Is it sunny?"].answers == pytest.approx({"yes": 1.0, "no": 1.0})

    # val2014 is the test split, every question kept, out-of-vocabulary answers too (they score 0).
    assert [ex.question for ex in data.test] == ["What sport is this?", "How many dogs are there?"]
    sport, dogs = data.test
    assert sport.image == root / "val2014/COCO_val2014_000000000042.jpg"
    assert sport.answers == {"tennis": 1.0}
    assert dogs.answers == pytest.approx({"1": 2 / 3, "2": 1.0, "3": 1 / 3})
    assert load_image(dogs.image, ImageSpec(8)).shape == (3, 8, 8)


def test_vqav2_default_vocabulary_keeps_answers_seen_nine_times(tmp_path):
    data = load_vqav2(dataset("vqav2", tmp_path))
    assert data.labels == ["yes"]
    assert len(data.train) == 10 and all("yes" in ex.answers for ex in data.train)
    with pytest.raises(AnnotationError, match="no training answer occurs 11 or more times"):
        load_vqav2(tmp_path / "vqav2", min_answer_count=11)


def test_vqav2_bad_json_names_the_file_and_line(tmp_path):
    root = dataset("vqav2", tmp_path)
    path = root / "v2_mscoco_train2014_annotations.json"
    path.write_text(path.read_text()[:-40])
    with pytest.raises(AnnotationError, match=r"v2_mscoco_train2014_annotations\.json:1: bad JSON"):
        load_vqav2(root, min_answer_count=2)


def test_vqav2_missing_field_names_the_file_and_record(tmp_path):
    root = dataset("vqav2", tmp_path)
    edit_json(root / "v2_mscoco_train2014_annotations.json", lambda d: d["annotations"][2].pop("answers"))
    with pytest.raises(AnnotationError, match=r"annotations\.json: annotations\[2\]: missing field 'answers'"):
        load_vqav2(root, min_answer_count=2)
    root = dataset("vqav2", tmp_path / "again")
    edit_json(root / "v2_OpenEnded_mscoco_val2014_questions.json", lambda d: d["questions"][1].pop("image_id"))
    with pytest.raises(AnnotationError, match=r"val2014_questions\.json: questions\[1\]: missing field 'image_id'"):
        load_vqav2(root, min_answer_count=2)


def test_vqav2_question_without_annotation_is_an_error(tmp_path):
    root = dataset("vqav2", tmp_path)
    edit_json(root / "v2_mscoco_val2014_annotations.json", lambda d: d["annotations"].pop(0))
    with pytest.raises(
        AnnotationError, match=r"questions\[0\]: question_id 42000 has no entry in .*val2014_annotations"
    ):
        load_vqav2(root, min_answer_count=2)


def test_vqav2_missing_image_names_the_question_and_the_image(tmp_path):
    root = dataset("vqav2", tmp_path)
    (root / "val2014/COCO_val2014_000000000073.jpg").unlink()
    with pytest.raises(
        AnnotationError, match=r"val2014_questions\.json: questions\[1\]: image file .*COCO_val2014_000000000073\.jpg"
    ):
        load_vqav2(root, min_answer_count=2)


def test_vqav2_missing_annotation_file_shows_the_layout(tmp_path):
    root = dataset("vqav2", tmp_path)
    (root / "v2_mscoco_val2014_annotations.json").unlink()
    with pytest.raises(AnnotationError, match=r"v2_mscoco_val2014_annotations\.json not found; expected layout"):
        load_vqav2(root)


# ---------------------------------------------------------------------------------------------------
# SNLI-VE


def test_snli_ve_loads_both_id_spellings_and_labels(tmp_path):
    root = dataset("snli_ve", tmp_path)
    data = load_snli_ve(root)
    assert data.task == "entailment" and data.labels == list(ENTAILMENT_LABELS)
    assert [ex.label for ex in data.train] == [
        "entailment",
        "contradiction",
        "neutral",
        "entailment",
        "contradiction",
    ]
    assert data.train[0].image == root / "flickr30k_images/3416050480.jpg"
    assert data.train[0].hypothesis == "A man is resting outside."
    assert data.train[3].image == root / "flickr30k_images/2267923837.jpg"  # the "Flikr30kID" spelling
    assert [ex.hypothesis for ex in data.test] == ["A kid wears a coat.", "A kid is swimming."]
    dev = load_snli_ve(root, test_split="dev")
    assert [ex.image.name for ex in dev.test] == ["1000092795.jpg"] and dev.meta["test_split"] == "dev"
    with pytest.raises(ValueError, match="use 'dev' or 'test'"):
        load_snli_ve(root, test_split="train")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r.pop("sentence2"), "snli_ve_train.jsonl:3: missing field 'sentence2'"),
        (lambda r: r.update(gold_label="-"), "snli_ve_train.jsonl:3: bad gold_label '-'; expected one of"),
        (lambda r: r.update(sentence2=""), "snli_ve_train.jsonl:3: field 'sentence2' has a bad value ''"),
        (lambda r: r.pop("Flickr30K_ID"), "snli_ve_train.jsonl:3: missing field 'Flickr30K_ID' \\(or 'Flikr30kID'\\)"),
        ('{"sentence2": "A man", ', "snli_ve_train.jsonl:3: bad JSON"),
        ("[1, 2]", "snli_ve_train.jsonl:3: expected a JSON object, got list"),
    ],
)
def test_snli_ve_malformed_record_names_the_file_and_line(tmp_path, edit, message):
    root = dataset("snli_ve", tmp_path)
    edit_line(root / "snli_ve_train.jsonl", 3, edit)
    with pytest.raises(AnnotationError, match=message):
        load_snli_ve(root)


def test_snli_ve_missing_image_names_the_line_and_blank_lines_still_count(tmp_path):
    root = dataset("snli_ve", tmp_path)
    path = root / "snli_ve_train.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines[:3], "", *lines[3:]]) + "\n")  # the Flikr30kID records move to lines 5-6
    (root / "flickr30k_images/2267923837.jpg").unlink()
    with pytest.raises(AnnotationError, match=r"snli_ve_train\.jsonl:5: image file .*2267923837\.jpg not found"):
        load_snli_ve(root)


# ---------------------------------------------------------------------------------------------------
# NLVR2


def test_nlvr2_loads_two_images_per_example_and_labels(tmp_path):
    root = dataset("nlvr2", tmp_path)
    data = load_nlvr2(root)
    assert data.task == "reasoning" and data.labels == ["False", "True"]
    assert [ex.label for ex in data.train] == [False, True, True]
    first = data.train[0]
    assert first.images == (
        root / "images/train/29/train-10171-0-img0.png",
        root / "images/train/29/train-10171-0-img1.png",
    )
    assert first.statement.startswith("An image shows one leather pencil case")
    assert data.train[2].images[1] == root / "images/train/0/train-8253-2-img1.png"
    assert [ex.images[0].name for ex in data.test] == ["test1-0-1-img0.png"] * 2  # two sentences, one pair
    assert [ex.label for ex in data.test] == [True, False]
    assert target_of(data.test[1], data.labels) == [1.0, 0.0]
    dev = load_nlvr2(root, test_split="dev")
    assert dev.test[0].images == (root / "dev/dev-850-0-img0.png", root / "dev/dev-850-0-img1.png")
    with pytest.raises(ValueError, match="use 'dev' or 'test1'"):
        load_nlvr2(root, test_split="test2")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r.update(label="true"), "train.json:2: bad label 'true'; expected 'True' or 'False'"),
        (lambda r: r.update(label=True), "train.json:2: field 'label' has a bad value True"),
        (lambda r: r.pop("directory"), "train.json:2: missing field 'directory'"),
        (lambda r: r.pop("sentence"), "train.json:2: missing field 'sentence'"),
        (lambda r: r.update(identifier="train10171"), "train.json:2: bad identifier 'train10171'"),
        ("{not json", "train.json:2: bad JSON"),
    ],
)
def test_nlvr2_malformed_record_names_the_file_and_line(tmp_path, edit, message):
    root = dataset("nlvr2", tmp_path)
    edit_line(root / "train.json", 2, edit)
    with pytest.raises(AnnotationError, match=message):
        load_nlvr2(root)


def test_nlvr2_missing_second_image_names_the_line(tmp_path):
    root = dataset("nlvr2", tmp_path)
    (root / "test1/test1-0-1-img1.png").unlink()
    with pytest.raises(AnnotationError, match=r"test1\.json:1: image file .*test1-0-1-img1\.png not found"):
        load_nlvr2(root)


# ---------------------------------------------------------------------------------------------------
# load_data, the dispatcher


def test_load_data_dispatches_real_formats(tmp_path):
    vqa = load_data(f"vqav2:{dataset('vqav2', tmp_path)}", "vqa")
    assert vqa.name == "vqav2" and vqa.labels == ["yes"]
    snli = load_data(f"snli-ve:{dataset('snli_ve', tmp_path)}", "entailment")
    assert snli.name == "snli-ve" and len(snli.train) == 5
    nlvr2 = load_data(f"nlvr2:{dataset('nlvr2', tmp_path)}", "reasoning")
    assert nlvr2.name == "nlvr2" and len(nlvr2.train) == 3


def test_load_data_easy_vqa():
    data = load_data("easy-vqa", "vqa")
    assert (len(data.train), len(data.test), len(data.labels)) == (38575, 9673, 13)


@pytest.mark.parametrize(
    ("spec", "task", "message"),
    [
        (
            "flickr30k",
            "vqa",
            r"unknown data 'flickr30k': use one of easy-vqa, scenes\[:train=N,test=N,seed=N\], vqav2:DIR, snli-ve:DIR",
        ),
        ("snli-ve:/x", "vqa", "snli-ve has no 'vqa' task .*for vqa use one of: easy-vqa, scenes.*, vqav2:DIR"),
        ("easy-vqa", "reasoning", "easy-vqa has no 'reasoning' task .*for reasoning use one of: scenes.*, nlvr2:DIR"),
        ("scenes", "captioning", "unknown task 'captioning': use one of vqa, entailment, reasoning, itm"),
        ("nlvr2", "reasoning", "nlvr2 needs its data directory: use --data nlvr2:/path/to/nlvr2"),
        ("nlvr2:/no/such/dir", "reasoning", "nlvr2: /no/such/dir is not a directory"),
        ("easy-vqa:/x", "vqa", "easy-vqa takes no parameters"),
    ],
)
def test_load_data_rejects_bad_specs_with_the_valid_choices(spec, task, message):
    with pytest.raises(ValueError, match=message):
        load_data(spec, task)
