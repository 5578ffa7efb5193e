"""The auxiliary grid losses: pooling patches into cells, the loss, easy-VQA's labels, and training with it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from training import scene_language, train
from training.data import load_data
from training.easy_vqa import SHAPES, answer_type
from training.evaluate import evaluate_dir
from training.examples import GridSpec
from training.grid import GridProbe, GridTrainee, SceneProbe
from training.steps import StudentTrainingView
from training.teacher import build_teacher, student_from_teacher
from training.tokenizer import train_wordpiece


def test_patches_pool_into_grid_cells_in_raster_order():
    probe = GridProbe(hidden=1, cell_classes=2, named_classes=3, grid=2)
    # A 4x4 patch grid whose value is the patch index: each 2x2 cell averages its four patches.
    patches = torch.arange(16.0).view(1, 16, 1)
    cells = probe.cells_of(patches)[0, :, 0]
    assert cells.tolist() == [2.5, 4.5, 10.5, 12.5]
    with pytest.raises(ValueError, match="do not tile"):
        probe.cells_of(torch.zeros(1, 15, 1))


def test_grid_loss_reads_the_chosen_layer_and_trains_the_vilt():
    tok = train_wordpiece(["is the red circle left of the blue square?"] * 3)
    teacher = build_teacher("tiny", "vqa", ["yes", "no"], tok, "test")  # 32x32 images, 4x4 patches
    trainee = GridTrainee(teacher.model, GridProbe(teacher.config.hidden_size, 14, 3, grid=4), layer=1)
    ids, mask = (torch.from_numpy(a) for a in teacher.text(["is the red circle left of the blue square?"] * 2))
    pixels = torch.randn(2, 3, 32, 32)
    cells, named = torch.randint(0, 14, (2, 1, 16)), torch.randint(0, 3, (2, 1, 16))
    logits, loss = trainee(ids, mask, pixels, cells, named)
    assert logits.shape == (2, 2) and loss.ndim == 0 and loss > 0
    loss.backward()
    layers = teacher.model.vilt.encoder.layer
    assert layers[0].attention.attention.query.weight.grad.abs().sum() > 0  # below the probe: trained by it
    assert layers[1].attention.attention.query.weight.grad is None  # above layer 1: untouched by the grid loss
    with pytest.raises(ValueError, match=r"layer must be in 1\.\.2"):
        GridTrainee(teacher.model, GridProbe(teacher.config.hidden_size, 14, 3, grid=4), layer=3)


def test_cells_a_text_does_not_name_for_sure_are_left_out_of_the_named_loss():
    """Image-text matching: which cells a negative caption names is unknown (-100), so only the matched rows
    teach the named read-out, and a batch with none known adds 0, not the 0/0 of an empty mean."""
    torch.manual_seed(0)
    probe = GridProbe(hidden=8, cell_classes=5, named_classes=3, grid=2)
    patches, cells = torch.randn(4, 1, 16, 8), torch.randint(0, 5, (4, 1, 4))
    named = torch.randint(0, 3, (4, 1, 4))
    named[2:] = -100  # rows 2 and 3: negative captions
    unknown = torch.full_like(named, -100)
    got = probe.loss(patches, cells, named) - probe.loss(patches, cells, unknown)
    want = probe.loss(patches[:2], cells[:2], named[:2]) - probe.loss(patches[:2], cells[:2], unknown[:2])
    assert got > 0 and torch.isfinite(probe.loss(patches, cells, unknown))
    torch.testing.assert_close(got, want)


def test_the_fact_probe_reads_each_images_pooled_output():
    """Two-image statements: the fact of each image is read from that image's pooled output, the vector the
    NLVR2 head concatenates, so the loss reaches the pooler; without facts it does not."""
    tok = train_wordpiece(["both images contain a red circle."] * 3)
    teacher = build_teacher("tiny", "reasoning", ["False", "True"], tok, "test")
    trainee = GridTrainee(teacher.model, GridProbe(teacher.config.hidden_size, 14, 3, grid=4, fact_classes=5))
    ids, mask = (torch.from_numpy(a) for a in teacher.text(["both images contain a red circle."] * 2))
    pixels = torch.randn(2, 2, 3, 32, 32)
    cells, named = torch.randint(0, 14, (2, 2, 16)), torch.randint(0, 3, (2, 2, 16))
    facts = torch.tensor([[0, 1], [2, 4]])
    logits, without = trainee(ids, mask, pixels, cells, named)
    _, loss = trainee(ids, mask, pixels, cells, named, facts)
    assert logits.shape == (2, 2) and loss > without
    loss.backward()
    assert teacher.model.vilt.pooler.dense.weight.grad.abs().sum() > 0
    trainee.zero_grad(set_to_none=True)
    trainee(ids, mask, pixels, cells, named)[1].backward()
    assert teacher.model.vilt.pooler.dense.weight.grad is None


def test_teacher_cli_trains_with_the_grid_loss_on_scenes(tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setenv("DIDE_DATA_DIR", str(tmp_path / "data"))
    out = tmp_path / "teacher"
    common = ["--task", "reasoning", "--data", "scenes:train=12,test=4", "--size", "tiny", "--epochs", "1"]
    assert train.main(["teacher", *common, "--batch-size", "8", "--augment", "none", "--grid-loss", "1",
                       "--out", str(out)]) == 0  # fmt: skip
    assert json.loads((out / "dide.json").read_text())["training"]["grid_loss"] == 1.0
    result = evaluate_dir(out)  # accuracy per statement type, which adds up to the overall accuracy
    by_kind = result["by_kind"]
    templates = {entry[0] for entry in scene_language.REASONING_STATEMENTS.values()}
    assert set(by_kind) <= templates and sum(k["n"] for k in by_kind.values()) == result["n"]
    assert sum(k["accuracy"] * k["n"] for k in by_kind.values()) == pytest.approx(result["accuracy"] * result["n"])
    true = sum(ex.label for ex in load_data("scenes:train=12,test=4", "reasoning").test)  # chance: the larger class
    assert result["majority"] == max(true, result["n"] - true) / result["n"]
    capsys.readouterr()
    assert train.main(["teacher", *common, "--augment", "flip", "--grid-loss", "1", "--out", str(tmp_path / "x")]) != 0
    assert "--grid-loss needs --augment none" in capsys.readouterr().err
    easy = ["--data", "easy-vqa", "--max-train", "8", "--size", "tiny", "--epochs", "1", "--grid-loss", "1"]
    assert train.main(["teacher", "--task", "itm", *easy, "--out", str(tmp_path / "y")]) != 0
    assert "needs data with grid labels" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    # easy-VQA's one shape per image is a 1x1 grid: flips and shifts keep its label, so augmentation is allowed.
    assert train.main(["teacher", "--task", "vqa", *easy, "--augment", "flip", "--out", str(tmp_path / "e")]) == 0

    # The student's scene probe: a product-fusion student distilled with it from that teacher.
    student = tmp_path / "student"
    caplog.set_level(logging.INFO)
    flags = ["--fusion", "product", "--grid-loss", "0.5", "--fact-loss", "0.25", "--augment", "none"]
    flags += ["--log-every", "1"]
    assert train.main(["distill", "--task", "reasoning", "--teacher", str(out), "--epochs", "1", "--batch-size", "8",
                       *flags, "--out", str(student)]) == 0  # fmt: skip
    saved = json.loads((student / "config.json").read_text())
    assert saved["student"]["fusion"] == "product" and saved["loss_weights"]["grid"] == 0.5
    assert saved["loss_weights"]["facts"] == 0.25
    assert "grid=" in caplog.text and "facts=" in caplog.text  # the probe's losses are logged with the others
    assert sorted(p.name for p in student.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    # A saved student keeps its fusion: starting from it with another is refused, saying which to pass.
    capsys.readouterr()
    again = ["distill", "--task", "reasoning", "--teacher", str(out), "--init", str(student)]
    again += ["--out", str(tmp_path / "z")]
    assert train.main(again) != 0
    assert "fuses with 'product': pass --fusion product" in capsys.readouterr().err
    no_grid = ["distill", "--task", "reasoning", "--teacher", str(out), "--fact-loss", "1", "--augment", "none"]
    assert train.main([*no_grid, "--out", str(tmp_path / "z")]) != 0
    assert "--fact-loss needs --grid-loss > 0" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()


def test_scene_probe_reads_every_cell_from_the_pooled_vector():
    torch.manual_seed(0)
    probe = SceneProbe(hidden=8, cell_classes=3, grid=2)
    pooled, cells = torch.randn(5, 8), torch.randint(0, 3, (5, 4))
    logits = probe.read(pooled).view(5, 4, 3)
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), cells.flatten())
    torch.testing.assert_close(probe.loss(pooled, cells), want)
    opt = torch.optim.Adam(probe.parameters(), lr=0.1)
    for _ in range(200):  # a linear read-out can fit 5 examples' cells exactly
        opt.zero_grad()
        probe.loss(pooled, cells).backward()
        opt.step()
    assert (probe.read(pooled).view(5, 4, 3).argmax(-1) == cells).all()


def test_unknown_cells_are_left_out_of_the_probe_losses_even_a_whole_batch_of_them():
    torch.manual_seed(0)
    probe = SceneProbe(hidden=8, cell_classes=3, grid=1)
    pooled, cells = torch.randn(4, 8), torch.tensor([[0], [-100], [2], [-100]])
    known = torch.tensor([0, 2])
    want = torch.nn.functional.cross_entropy(probe.read(pooled)[known], cells[known, 0])
    torch.testing.assert_close(probe.loss(pooled, cells), want)
    unknown = torch.full((4, 1), -100)  # e.g. a batch of easy-VQA images whose questions tell no class
    loss = probe.loss(pooled, unknown)
    assert loss.item() == 0.0  # not 0/0
    loss.backward()
    assert probe.read.weight.grad.abs().sum() == 0
    teacher_probe = GridProbe(hidden=8, cell_classes=3, named_classes=0, grid=1)
    assert teacher_probe.loss(torch.randn(4, 1, 16, 8), unknown[:, None], None).item() == 0.0


def test_the_students_fact_probe_reads_the_fusion_of_the_text_with_each_image():
    tok = train_wordpiece(["both images contain a red circle."] * 3)
    teacher = build_teacher("tiny", "reasoning", ["False", "True"], tok, "test")
    student = student_from_teacher(teacher, fusion="product")
    view = StudentTrainingView(student, SceneProbe(student.config.hidden_size, 14, grid=4, fact_classes=5)).train()
    ids, mask = (torch.from_numpy(a) for a in teacher.text(["both images contain a red circle."] * 2))
    pixels, pixels2 = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    cells, facts = torch.randint(0, 14, (2, 2, 16)), torch.tensor([[0, 1], [2, 4]])
    assert set(view(ids, mask, pixels, pixels2, False, cells)[3]) == {"grid"}
    logits, _, _, aux = view(ids, mask, pixels, pixels2, False, cells, facts)
    assert logits.shape == (2, 2) and set(aux) == {"grid", "facts"} and aux["facts"] > 0
    aux["facts"].backward()
    assert student.fusion[0].weight.grad.abs().sum() > 0
    view.zero_grad(set_to_none=True)
    view(ids, mask, pixels, pixels2, False, cells)[3]["grid"].backward()
    assert student.fusion[0].weight.grad is None  # only the facts reach the fusion through the probe


def test_easy_vqa_questions_carry_their_images_shape_class():
    data = load_data("easy-vqa", "vqa")
    assert data.grid == GridSpec(side=1, cell_classes=24)  # 8 colours x 3 shapes, one cell, no naming
    colors = sorted({a for e in data.train for a in e.answers if answer_type(a) == "color"})
    classes: dict[Path, int] = {}
    checked = 0
    for e in data.train:
        (c,) = e.grid.cells[0]
        assert e.grid.named is None and classes.setdefault(e.image, c) == c  # one class per image
        answer = next(iter(e.answers))
        if c >= 0 and e.question in ("what color is the shape?", "what shape is in the image?"):
            told = colors[c // 3] if e.kind == "color" else SHAPES[c % 3]
            assert told == answer, (e, c)
            checked += 1
    known = [c for c in classes.values() if c >= 0]
    assert checked > 1000 and len(known) > 0.85 * len(classes) and set(known) == set(range(24))
    assert set(classes.values()) - set(known) == {-100}  # images whose questions do not tell both
