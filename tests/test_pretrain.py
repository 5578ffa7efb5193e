"""DiDE stage 1: image-caption pair data, ITM pairs, ITM teachers, `pretrain`, and stage 2 started from stage 1."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer
from transformers import ViltConfig, ViltForImageAndTextRetrieval

from training import scene_language, scene_splits, scene_world, scenes
from training.annotations import AnnotationError
from training.data import load_data
from training.dataset import itm_pairs
from training.examples import GridSpec, PairExample
from training.student import load_student
from training.teacher import build_teacher, load_teacher, student_for_teacher, teacher_for_task
from training.tokenizer import train_wordpiece
from training.train import main

SCENES = "scenes:train=24,test=12,seed=3"
FAST = ["--epochs", "1", "--batch-size", "8", "--log-every", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIDE_DATA_DIR", str(tmp_path_factory.mktemp("data")))
        yield


def run_eval(capsys, model_dir: Path) -> dict:
    capsys.readouterr()
    assert main(["eval", "--model", str(model_dir)]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def save_image(path: Path, shade: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), (shade, 100, 200)).save(path)


# ---------------------------------------------------------------------------------------------------
# COCO captions and pair files, in their exact formats


def write_coco(root: Path, n_images: int = 20) -> Path:
    """captions_train2014.json as COCO ships it (info, licenses, images, annotations), with its images."""
    images, annotations = [], []
    for i in range(n_images):
        image_id = 57870 + i
        name = f"COCO_train2014_{image_id:012d}.jpg"
        images.append({"license": 5, "file_name": name, "coco_url": f"http://images.cocodataset.org/train2014/{name}",
                       "height": 6, "width": 8, "date_captured": "2013-11-14 16:28:13", "id": image_id})  # fmt: skip
        for k in range(2):
            annotations.append({"image_id": image_id, "id": 100 * i + k, "caption": f"A photo {i} of things {k}.\n "})
        save_image(root / "train2014" / name, 10 * i)
    coco = {"info": {"description": "COCO 2014 Dataset", "version": "1.0", "year": 2014}, "licenses": [],
            "images": images, "annotations": annotations}  # fmt: skip
    path = root / "annotations" / "captions_train2014.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(coco))
    return path


def test_coco_captions_hold_out_a_seeded_share_of_images(tmp_path):
    path = write_coco(tmp_path)
    data = load_data(f"coco:{path},images={tmp_path / 'train2014'}", "itm")
    assert data.task == "itm" and data.labels == ["match"] and data.name == "coco"
    assert len(data.train) + len(data.test) == 40 and all(isinstance(e, PairExample) for e in data.train)
    test_images = {e.image for e in data.test}
    assert len(test_images) == 1 and not test_images & {e.image for e in data.train}  # 5% of 20, both captions
    assert Counter(e.image for e in data.test).most_common(1)[0][1] == 2
    first = data.train[0]
    assert first.caption == re.sub(r"\s+", " ", first.caption).strip() and first.negatives == ()
    assert first.image.is_file() and first.image.parent == tmp_path / "train2014"
    again = load_data(f"coco:{path},images={tmp_path / 'train2014'}", "itm")
    assert again.train == data.train and again.test == data.test
    # Without images=DIR, file names are relative to the JSON's directory.
    shutil.copytree(tmp_path / "train2014", path.parent, dirs_exist_ok=True)
    assert len(load_data(f"coco:{path}", "itm").train) == len(data.train)


def edit_coco(path: Path, edit) -> None:
    coco = json.loads(path.read_text())
    edit(coco)
    path.write_text(json.dumps(coco))


def test_coco_errors_name_the_file_and_record(tmp_path):
    path = write_coco(tmp_path)
    spec = f"coco:{path},images={tmp_path / 'train2014'}"
    edit_coco(path, lambda c: c["annotations"][3].pop("caption"))
    with pytest.raises(AnnotationError, match=rf"{re.escape(str(path))}: annotations\[3\]: missing field 'caption'"):
        load_data(spec, "itm")
    path = write_coco(tmp_path / "b")
    spec = f"coco:{path},images={tmp_path / 'b' / 'train2014'}"
    (tmp_path / "b" / "train2014" / "COCO_train2014_000000057872.jpg").unlink()
    with pytest.raises(
        AnnotationError, match=r"captions_train2014\.json: images\[2\]: image file .*57872\.jpg not found"
    ):
        load_data(spec, "itm")
    edit_coco(path, lambda c: c["annotations"][0].update(image_id=1))
    with pytest.raises(AnnotationError, match=r"annotations\[0\]: image_id 1 is not in the file's 'images'"):
        load_data(spec, "itm")
    edit_coco(path, lambda c: c.pop("images"))
    with pytest.raises(AnnotationError, match="expected a JSON object with a list under 'images'"):
        load_data(spec, "itm")


def test_pair_files_tsv_and_jsonl(tmp_path):
    for i in range(3):
        save_image(tmp_path / "img" / f"{i}.png", 50 * i)
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("img/0.png\ta red  circle\n\nimg/1.png\ta blue square\nimg/2.png\ta green triangle\n")
    data = load_data(f"pairs:{tsv}", "itm")
    pairs = sorted(data.train + data.test, key=lambda e: e.image)
    assert [(e.image, e.caption) for e in pairs] == [
        (tmp_path / "img/0.png", "a red circle"),
        (tmp_path / "img/1.png", "a blue square"),
        (tmp_path / "img/2.png", "a green triangle"),
    ]
    assert len(data.test) == 1 and data.name == "pairs"
    jsonl = tmp_path / "pairs.jsonl"
    records = [{"image": f"img/{i}.png", "caption": f"shape {i}", "negatives": [f"not shape {i}"]} for i in range(3)]
    jsonl.write_text("\n".join(map(json.dumps, records)) + "\n")
    data = load_data(f"pairs:{jsonl}", "itm")
    assert sorted(e.negatives for e in data.train + data.test) == [("not shape 0",), ("not shape 1",), ("not shape 2",)]

    tsv.write_text("img/0.png\ta red circle\nimg/1.png a blue square\n")
    with pytest.raises(AnnotationError, match=r"pairs\.tsv:2: expected image_path<TAB>caption"):
        load_data(f"pairs:{tsv}", "itm")
    tsv.write_text("img/0.png\ta red circle\nimg/9.png\ta blue square\n")
    with pytest.raises(AnnotationError, match=r"pairs\.tsv:2: image file .*img/9\.png not found"):
        load_data(f"pairs:{tsv}", "itm")
    jsonl.write_text(json.dumps(records[0]) + "\n" + json.dumps({"image": "img/1.png"}) + "\n")
    with pytest.raises(AnnotationError, match=r"pairs\.jsonl:2: missing field 'caption'"):
        load_data(f"pairs:{jsonl}", "itm")
    jsonl.write_text(json.dumps(records[0]) + "\n{not json\n")
    with pytest.raises(AnnotationError, match=r"pairs\.jsonl:2: bad JSON"):
        load_data(f"pairs:{jsonl}", "itm")


@pytest.mark.parametrize(
    ("spec", "task", "message"),
    [
        ("coco", "itm", r"coco needs its file: use --data coco:CAPTIONS_JSON\[,images=DIR\]"),
        ("coco:/x.json,imgs=/y", "itm", r"bad coco parameter 'imgs=/y'"),
        ("coco:/no/such.json", "itm", r"/no/such\.json not found"),
        ("pairs:/x.csv", "itm", r"a pairs file must end in \.tsv or \.jsonl"),
        ("coco:/x.json", "vqa", r"coco has no 'vqa' task \(only itm\); for vqa use one of: easy-vqa, scenes"),
        ("vqav2:/x", "itm", r"for itm use one of: easy-vqa, scenes.*, coco:CAPTIONS_JSON\[,images=DIR\], pairs:"),
    ],
)
def test_itm_specs_fit_the_table(spec, task, message):
    with pytest.raises(ValueError, match=message):
        load_data(spec, task)


# ---------------------------------------------------------------------------------------------------
# Generated captions: scenes and easy-VQA

CAPTION = re.compile(
    r"a (\w+) (\w+) is (left of|right of|above|below) a (\w+) (\w+)\.(?: there (?:is|are) also (.*)\.)?"
)
NUMBERS = {"a": 1, "two": 2, "three": 3}


def parse_scene_caption(text: str) -> tuple[Counter, tuple[str, str], str, tuple[str, str]]:
    """(every (colour, kind) the caption names, counted), the related pair and the relation."""
    m = CAPTION.fullmatch(text)
    assert m, text
    a, relation, b = (m[1], m[2]), m[3], (m[4], m[5])
    named = Counter([a, b])
    for part in (m[6] or "").split(" and ") if m[6] else []:
        count, color, kind = part.split()
        named[(color, kind.removesuffix("s"))] += NUMBERS[count]
    return named, a, relation, b


def true_for(text: str, scene: scene_world.Scene) -> bool:
    named, a, relation, b = parse_scene_caption(text)
    have = Counter((s.color, s.shape) for s in scene.shapes)
    related = any(
        x is not y and scene_world.relation_holds(x, relation, y)
        for x in scene.shapes
        if (x.color, x.shape) == a
        for y in scene.shapes
        if (y.color, y.shape) == b
    )
    return related and all(have[d] >= n for d, n in named.items())


def one_change(caption: str, negative: str) -> bool:
    """Whether the negative differs from the caption in exactly one colour, kind of shape or relation."""
    named, a, relation, b = parse_scene_caption(caption)
    n_named, n_a, n_relation, n_b = parse_scene_caption(negative)
    if relation != n_relation:
        return (named, a, b) == (n_named, n_a, n_b)
    gone, new = named - n_named, n_named - named
    if sum(gone.values()) != 1 or sum(new.values()) != 1:
        return False
    (old_color, old_kind), (new_color, new_kind) = next(iter(gone)), next(iter(new))
    return (old_color == new_color) != (old_kind == new_kind)


def test_scene_captions_are_true_and_their_hard_negatives_false():
    generated, records = scene_splits._itm_split(300, random.Random(0))
    kinds = Counter()
    for scene, record in zip(generated, records, strict=True):
        assert true_for(record["caption"], scene), record
        named, *_ = parse_scene_caption(record["caption"])
        assert named == Counter((s.color, s.shape) for s in scene.shapes)  # it describes every shape
        assert record["negatives"]
        for negative in record["negatives"]:
            assert not true_for(negative, scene) and one_change(record["caption"], negative), (record, negative)
            kinds[parse_scene_caption(negative)[2] != parse_scene_caption(record["caption"])[2]] += 1
    assert kinds[True] > 100 and kinds[False] > 300  # relation changes and attribute changes both common


def test_scene_pairs_are_generated_and_cached(data_dir):
    data = load_data("scenes:train=6,test=3,seed=0", "itm")
    assert (len(data.train), len(data.test), data.labels) == (6, 3, ["match"])
    assert all(isinstance(e, PairExample) and e.image.is_file() and e.negatives for e in data.train)
    assert Path(data.meta["directory"]).name == f"itm-train6-test3-seed0-v{scenes.VERSION}"
    assert load_data("scenes:train=6,test=3,seed=0", "itm").train == data.train


def test_scene_pairs_carry_their_images_cells_and_the_cells_their_caption_names(data_dir):
    data = load_data("scenes:train=6,test=3,seed=0", "itm")
    assert data.grid == GridSpec(scene_world.GRID, scene_world.CELL_CLASSES, scene_world.NAMED_CLASSES)
    for split, examples in (("train", data.train), ("test", data.test)):
        generated, _ = scene_splits.make_split("itm", len(examples), random.Random(f"scenes/itm/0/{split}"))
        for e, scene in zip(examples, generated, strict=True):
            assert e.grid.cells == (tuple(scene_world.cell_classes(scene)),)
            assert true_for(e.caption, scene)  # the scene drawn is the one the caption describes
            _, a, _, b = parse_scene_caption(e.caption)  # named: its relation's subject (1) and object (2)
            roles, named = {b: 2, a: 1}, [0] * scene_world.GRID**2  # a shape that fits both is the subject
            for s in scene.visible:
                named[s.row * scene_world.GRID + s.col] = roles.get((s.color, s.shape), 0)
            assert e.grid.named == (tuple(named),) and 1 in named and (2 in named) == (a != b)


def test_easy_vqa_captions_follow_the_images_answers():
    import easy_vqa

    data = load_data("easy-vqa", "itm")
    texts, answers, image_ids = easy_vqa.get_train_questions()
    paths = easy_vqa.get_train_image_paths()
    told: dict[Path, dict[str, str]] = {}  # what the two plainest questions say of an image
    for q, a, i in zip(texts, answers, image_ids, strict=True):
        if q in ("what color is the shape?", "what shape is in the image?"):
            told.setdefault(Path(paths[i]), {})[q.split()[1]] = a
    shapes = {"circle", "rectangle", "triangle"}
    attributes = set(easy_vqa.get_answers()) - {"yes", "no"}
    vocabulary = {w for q in texts for w in q.rstrip("?").split()} | set(answers)
    checked = 0
    for e in data.train:
        words = e.caption.split()
        assert set(words) <= vocabulary, e.caption  # captions speak easy-VQA's words
        if len(told.get(e.image, {})) == 2:  # both asked: the caption names exactly that colour and shape
            assert attributes & set(words) == set(told[e.image].values()), (e, told[e.image])
            checked += 1
        assert e.negatives
        for negative in e.negatives:  # one colour or one shape changed
            (old, new), *rest = [(a, b) for a, b in zip(words, negative.split(), strict=True) if a != b]
            assert not rest and {old, new} <= attributes and (old in shapes) == (new in shapes)
    assert checked > 200
    assert len({e.image for e in data.train}) > 3800 and len(data.test) > 3000


# ---------------------------------------------------------------------------------------------------
# Matched and mismatched pairs


def test_itm_pairs_take_a_hard_negative_or_another_images_caption():
    L = 4
    batch = {
        "input_ids": torch.arange(4)[:, None].expand(4, L).clone(),  # row i is all i: its caption
        "attention_mask": torch.ones(4, L, dtype=torch.long),
        "pixels": torch.arange(4, dtype=torch.float)[:, None, None, None].expand(4, 3, 2, 2).clone(),
        "target": torch.ones(4, 1),
        "image_id": torch.tensor([0, 0, 1, 2]),  # rows 0 and 1: two captions of one image
        "caption_id": torch.tensor([0, 1, 2, 2]),  # rows 2 and 3: the same caption string
        "negative_count": torch.tensor([1, 0, 0, 2]),
        "negative_ids": torch.full((4, 2, L), 100) + torch.tensor([0, 1])[None, :, None],  # 100, 101: hard
        "negative_mask": torch.ones(4, 2, L, dtype=torch.long),
    }
    for p_hard in (1.0, 0.0):
        out = itm_pairs(batch, torch.Generator().manual_seed(0), p_hard=p_hard)
        assert out["input_ids"].shape == (8, L) and out["pixels"].shape == (8, 3, 2, 2)
        assert out["target"][:, 0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
        negative = out["input_ids"][4:, 0].tolist()
        torch.testing.assert_close(out["pixels"][4:], batch["pixels"])  # each image once more
        assert out["pairs"].tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]]  # each image's rows, matched first
        if p_hard == 1.0:
            assert negative[0] == 100 and negative[3] in (100, 101)
        else:
            assert negative[0] in (2, 3) and negative[3] in (0, 1)  # never its own image's or caption string
        assert negative[1] in (2, 3) and negative[2] in (0, 1)  # no hard negative: another image's caption
    again = itm_pairs(batch, torch.Generator().manual_seed(0))
    torch.testing.assert_close(again, itm_pairs(batch, torch.Generator().manual_seed(0)))

    # The scenes' grid labels: an image's cells go with each of its rows, the cells its caption names only
    # with the matched row (a negative's are unknown, -100).
    cells, named = torch.randint(0, 14, (4, 1, 16)), torch.randint(0, 3, (4, 1, 16), dtype=torch.uint8)
    out = itm_pairs({**batch, "cells": cells, "named": named}, torch.Generator().manual_seed(0))
    assert torch.equal(out["cells"], torch.cat([cells, cells]))
    assert torch.equal(out["named"][:4], named.long()) and (out["named"][4:] == -100).all()
    assert "cells" not in again and "named" not in again


# ---------------------------------------------------------------------------------------------------
# ITM teachers, pretrain, and stage 2 from stage 1


def save_hf_itm_teacher(directory: Path) -> None:
    """A HF ViltForImageAndTextRetrieval (as dandelin/vilt-b32-finetuned-coco) with a tiny random config."""
    tokenizer = train_wordpiece(scene_language.ENTAILMENT_SPATIAL[:200], vocab_size=100)
    config = ViltConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=64,
                        patch_size=16, max_position_embeddings=40, vocab_size=tokenizer.get_vocab_size())  # fmt: skip
    torch.manual_seed(0)
    ViltForImageAndTextRetrieval(config).save_pretrained(directory)
    tokenizer.save(str(directory / "tokenizer.json"))


def test_a_hf_itm_checkpoint_is_a_pretrain_teacher(tmp_path, data_dir, capsys):
    hf = tmp_path / "hf-itm"
    save_hf_itm_teacher(hf)
    assert not (hf / "dide.json").exists()
    teacher = load_teacher(hf)
    assert (teacher.task, teacher.labels) == ("itm", ["match"])
    ids, mask = (torch.from_numpy(a) for a in teacher.text(["a red circle is left of a blue square."]))
    out = teacher.forward(ids, mask, torch.randn(1, 3, 64, 64), keep_qk=True)
    assert out.logits.shape == (1, 1) and out.qk[0][2].shape == (1, 2, 1 + 16, 16)
    with torch.no_grad():  # patches in raster order, as the student's image tower sees them
        _, _, (patch_index, _) = teacher.model.vilt.embeddings.visual_embed(
            torch.randn(2, 3, 64, 64), torch.ones(2, 64, 64), -1
        )
    raster = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij"), -1).view(1, 16, 2)
    assert torch.equal(patch_index, raster.expand(2, -1, -1))
    with pytest.raises(ValueError, match="is a teacher for itm, not for vqa; to fine-tune a vqa teacher from it"):
        load_teacher(hf, "vqa")

    out = tmp_path / "stage1"
    assert main(["pretrain", "--teacher", str(hf), "--data", SCENES, "--out", str(out), *FAST]) == 0
    student = load_student(out)
    assert (student.model.config.task, student.model.config.num_labels, student.labels) == ("itm", 1, ["match"])
    config = json.loads((out / "config.json").read_text())
    assert config["ranking"] is True and config["training"]["head_lr_mult"] == 1.0  # official: 10 for VQA only
    result = run_eval(capsys, out)
    assert result["task"] == "itm" and 0.0 <= result["accuracy"] <= 1.0
    assert result["n"] == 12  # a ranking head: each test image, its caption against one negative
    capsys.readouterr()
    assert main(["eval", "--model", str(hf), "--data", SCENES]) == 0  # a HF checkpoint names no data of its own
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 12
    assert main(["distill", "--task", "vqa", "--teacher", str(hf), "--data", SCENES, "--out", str(tmp_path / "x")]) == 2
    assert "is a teacher for itm, not for vqa" in capsys.readouterr().err


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, data_dir) -> tuple[Path, Path]:
    """A tiny ITM teacher trained on scene pairs, and the student `pretrain` distils from it."""
    runs = tmp_path_factory.mktemp("runs")
    teacher, student = runs / "itm-teacher", runs / "stage1"
    assert main(["teacher", "--task", "itm", "--data", SCENES, "--size", "tiny", "--out", str(teacher), *FAST]) == 0
    assert main(["pretrain", "--teacher", str(teacher), "--out", str(student), *FAST]) == 0
    return teacher, student


def logged_parts(text: str, name: str) -> list[float]:
    """Each training step line's value of one loss part (e.g. "grid=0.1234")."""
    return [float(v) for v in re.findall(rf"step \d+/\d+ epoch \d+ loss \S+ .*\b{name}=(\S+)", text)]


def test_an_itm_teacher_and_its_stage1_student_train_the_grid_rung_on_scene_pairs(data_dir, tmp_path, caplog):
    teacher, student = tmp_path / "itm-teacher", tmp_path / "stage1"
    grid = ["--grid-loss", "1", "--augment", "none"]
    caplog.set_level(logging.INFO, logger="training.loop")
    argv = ["teacher", "--task", "itm", "--data", SCENES, "--size", "tiny", *grid, "--out", str(teacher), *FAST]
    assert main(argv) == 0
    assert json.loads((teacher / "dide.json").read_text())["training"]["grid_loss"] == 1.0
    losses = logged_parts(caplog.text, "grid")
    assert len(losses) == 3 and all(0 < x < float("inf") for x in losses)  # 24 pairs / 8: cells and named, finite
    caplog.clear()
    assert main(["pretrain", "--teacher", str(teacher), *grid, "--out", str(student), *FAST]) == 0
    assert json.loads((student / "config.json").read_text())["loss_weights"]["grid"] == 1.0
    losses = logged_parts(caplog.text, "grid")  # the student's scene probe on its pooled image embeddings
    assert len(losses) == 3 and all(0 < x < float("inf") for x in losses)


def tokenizer_vocab(directory: Path) -> dict:
    return json.loads((directory / "tokenizer.json").read_text())["model"]["vocab"]


def test_two_stages_teacher_pretrain_teacher_distill_eval(stage1, tmp_path, capsys):
    itm_teacher, stage1_student = stage1
    assert json.loads((itm_teacher / "dide.json").read_text())["task"] == "itm"
    assert run_eval(capsys, itm_teacher)["n"] == 24 and run_eval(capsys, stage1_student)["task"] == "itm"
    assert json.loads((stage1_student / "config.json").read_text())["ranking"] is False  # a BCE-trained teacher

    teacher, student = tmp_path / "teacher", tmp_path / "student"
    argv = ["teacher", "--task", "vqa", "--data", SCENES, "--init", str(itm_teacher), "--out", str(teacher), *FAST]
    assert main(argv) == 0
    loaded = load_teacher(teacher)
    assert loaded.task == "vqa" and loaded.labels == scene_language.VQA_LABELS
    assert tokenizer_vocab(teacher) == tokenizer_vocab(itm_teacher)  # stage 2 shares stage 1's tokenizer
    tokenizer = Tokenizer.from_file(str(teacher / "tokenizer.json"))
    tokenizer.no_truncation()
    longest = max(len(e.ids) for e in tokenizer.encode_batch([e.question for e in load_data(SCENES, "vqa").train]))
    assert loaded.text.max_len == -(-longest // 4) * 4  # the questions' length, not the captions'

    argv = ["distill", "--task", "vqa", "--teacher", str(teacher), "--init", str(stage1_student), "--out", str(student)]
    assert main([*argv, *FAST]) == 0
    assert load_student(student).model.config.task == "vqa"
    result = run_eval(capsys, student)
    assert result["task"] == "vqa" and result["n"] == len(load_data(SCENES, "vqa").test)


def test_a_stage1_student_keeps_its_towers_under_a_new_head(stage1, tmp_path, capsys):
    itm_teacher, stage1_student = stage1
    base = load_teacher(itm_teacher)
    reasoning = teacher_for_task(base, "reasoning", [], SCENES, max_text_len=28)
    types = reasoning.model.vilt.embeddings.token_type_embeddings.weight
    old = base.model.vilt.embeddings.token_type_embeddings.weight
    assert types.shape[0] == 3 and torch.equal(types[:2], old) and torch.equal(types[2], old[1])
    torch.testing.assert_close(reasoning.model.vilt.encoder.state_dict(), base.model.vilt.encoder.state_dict())
    ids, mask = (torch.from_numpy(a) for a in reasoning.text(["both images have a circle left of a square."]))
    assert reasoning.forward(ids, mask, torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)).logits.shape == (1, 2)

    before = load_student(stage1_student).model
    student = student_for_teacher(stage1_student, reasoning)
    assert (student.config.task, student.config.num_labels, student.config.max_text_len) == ("reasoning", 2, 28)
    after, kept = student.state_dict(), before.state_dict()
    for key, value in kept.items():
        if key == "text_tower.position_embeddings.weight":
            assert torch.equal(after[key][: len(value)], value)
        elif key.startswith(("image_tower.", "text_tower.", "fusion.")):
            assert torch.equal(after[key], value), key
    assert after["classifier.3.weight"].shape == (2, 64)  # reasoning's head over two fused vectors

    other = tmp_path / "scratch-teacher"  # its own tokenizer: a stage-1 student cannot learn from it
    words = train_wordpiece(["what color is it?"] * 3)
    build_teacher("tiny", "vqa", scene_language.VQA_LABELS, words, SCENES).save(other)
    argv = [
        "distill",
        "--task",
        "vqa",
        "--teacher",
        str(other),
        "--init",
        str(stage1_student),
        "--out",
        str(tmp_path / "s"),
    ]
    assert main([*argv, *FAST]) == 2
    assert "does not fit the teacher: vocab size" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_pretrain_two_processes_on_cpu(stage1, tmp_path):
    itm_teacher, _ = stage1
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [torchrun, "--nproc_per_node", "2", "-m", "training.train", "pretrain", "--teacher", str(itm_teacher),
            "--out", str(out), *FAST]  # fmt: skip
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = load_student(out).model
    assert model.config.task == "itm" and all(torch.isfinite(p).all() for p in model.parameters())
