"""Synthetic scenes: exact labels, balance, text-only / image-only baselines near chance, caching."""

from __future__ import annotations

import json
import random
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training import scene_language, scene_splits, scene_world, scenes
from training.data import load_data
from training.examples import (
    ENTAILMENT_LABELS,
    EntailmentExample,
    ReasoningExample,
    TaskData,
    VQAExample,
    images_of,
    text_of,
)
from training.scene_language import entailment_label
from training.scene_render import OCCLUDER, render_scene
from training.scene_world import COLORS, Scene, Shape
from training.scenes import build_scenes, load_scenes

# Small enough to generate in a few seconds, large enough for the baselines to be measured to ~2 points.
SIZES = {"vqa": (400, 200), "entailment": (240, 120), "reasoning": (400, 200)}


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, TaskData]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIDE_DATA_DIR", str(tmp_path_factory.mktemp("dide-data")))
        return {task: load_scenes(task, train=tr, test=te, seed=0) for task, (tr, te) in SIZES.items()}


def label_of(ex) -> str:
    if isinstance(ex, VQAExample):
        (answer,) = ex.answers
        return answer
    return ex.label if isinstance(ex, EntailmentExample) else str(ex.label)


# ---------------------------------------------------------------------------------------------------
# Baselines: what text alone or pixels alone can do


def majority_rate(data: TaskData) -> float:
    majority = Counter(map(label_of, data.train)).most_common(1)[0][0]
    return np.mean([label_of(ex) == majority for ex in data.test])


def text_only_accuracy(data: TaskData, key=text_of) -> float:
    """The best text-only predictor: the majority answer per exact text (per key) on train, the overall
    majority for texts never seen in training."""
    per_key: dict[str, Counter] = defaultdict(Counter)
    for ex in data.train:
        per_key[key(ex)][label_of(ex)] += 1
    fallback = Counter(map(label_of, data.train)).most_common(1)[0][0]
    predict = {k: c.most_common(1)[0][0] for k, c in per_key.items()}
    return np.mean([predict.get(key(ex), fallback) == label_of(ex) for ex in data.test])


def image_only_accuracy(data: TaskData) -> float:
    """A ridge least-squares linear classifier on 16x16 average-pooled pixels (both images for reasoning)."""
    cache: dict[Path, np.ndarray] = {}

    def features(ex) -> np.ndarray:
        parts = []
        for path in images_of(ex):
            if path not in cache:
                rgb = np.asarray(Image.open(path).convert("RGB"), np.float32) / 255.0
                cache[path] = rgb.reshape(16, 4, 16, 4, 3).mean(axis=(1, 3)).ravel()
            parts.append(cache[path])
        return np.concatenate([*parts, [1.0]])

    index = {a: i for i, a in enumerate(data.labels)}
    x_train = np.stack([features(ex) for ex in data.train])
    y_train = np.eye(len(data.labels))[[index[label_of(ex)] for ex in data.train]]
    w = np.linalg.solve(x_train.T @ x_train + 10.0 * np.eye(x_train.shape[1]), x_train.T @ y_train)
    x_test = np.stack([features(ex) for ex in data.test])
    predicted = np.argmax(x_test @ w, axis=1)
    return np.mean([data.labels[p] == label_of(ex) for p, ex in zip(predicted, data.test, strict=True)])


@pytest.mark.parametrize("task", ["entailment", "reasoning"])
def test_text_only_and_image_only_stay_near_the_majority_rate(sets, task):
    data = sets[task]
    chance = majority_rate(data)
    text_only, image_only = text_only_accuracy(data), image_only_accuracy(data)
    print(f"{task}: majority {chance:.3f}, text-only {text_only:.3f}, image-only {image_only:.3f}")
    assert chance == pytest.approx(1 / len(data.labels), abs=0.01)
    # Generated without the balancing, text-only scores 4 (entailment) and 9 (reasoning) points above.
    assert text_only - chance <= 0.03
    assert image_only - chance <= 0.03


def test_vqa_text_only_knows_only_the_question_type_and_image_only_stays_near_the_majority_rate(sets):
    """A question's wording tells its answer type ("what color" -> a colour) in any VQA set, so the
    reference for text alone is chance among the answers of each question's template; neither the
    template nor the exact text may do better. Pixels alone do not know the question and stay near
    the overall majority rate."""
    data = sets["vqa"]
    chance = majority_rate(data)
    chance_given_type = np.mean(
        [1 / len(scene_language.VQA_ANSWER_SPACES[scene_language.VQA_QUESTIONS[ex.question][0]]) for ex in data.test]
    )
    template_prior = text_only_accuracy(data, key=lambda ex: scene_language.VQA_QUESTIONS[ex.question][0])
    text_only, image_only = text_only_accuracy(data), image_only_accuracy(data)
    print(
        f"vqa: majority {chance:.3f}, chance given the answer type {chance_given_type:.3f}, "
        f"template prior {template_prior:.3f}, text-only {text_only:.3f}, image-only {image_only:.3f}"
    )
    # Generated without the balancing, the template prior alone scores 6 points above chance.
    assert template_prior - chance_given_type <= 0.02
    assert text_only - template_prior <= 0.03
    assert image_only - chance <= 0.03


# ---------------------------------------------------------------------------------------------------
# Balance and format


def test_labels_are_balanced(sets):
    for task in ("entailment", "reasoning"):
        data = sets[task]
        for split in (data.train, data.test):
            counts = Counter(map(label_of, split))
            assert set(counts) == set(data.labels)
            assert len(set(counts.values())) == 1, counts  # exactly equal
            # ... and per image (entailment) or image pair (reasoning), so pixels carry no label.
            per_image = defaultdict(Counter)
            for ex in split:
                per_image[images_of(ex)][label_of(ex)] += 1
            assert all(len(set(c.values())) == 1 and len(c) == len(data.labels) for c in per_image.values())
    vqa = sets["vqa"]
    per_template: dict[str, Counter] = defaultdict(Counter)
    for ex in vqa.train:
        per_template[scene_language.VQA_QUESTIONS[ex.question][0]][label_of(ex)] += 1
    assert set(per_template) == set(scene_language.VQA_ANSWER_SPACES)  # binding, spatial and counting questions
    for template, counts in per_template.items():
        assert set(counts) == set(scene_language.VQA_ANSWER_SPACES[template])
        assert max(counts.values()) - min(counts.values()) <= 2, (template, counts)


def test_examples_point_at_64x64_rgb_images_and_known_labels(sets):
    for task, data in sets.items():
        n_train_images, n_test_images = SIZES[task]
        assert len({p for ex in data.train for p in images_of(ex)}) == n_train_images
        assert len({p for ex in data.test for p in images_of(ex)}) == n_test_images
        for ex in data.train[:50] + data.test[:50]:
            assert label_of(ex) in data.labels
            for path in images_of(ex):
                with Image.open(path) as img:
                    assert img.size == (64, 64) and img.mode == "RGB"
    assert 3.3 <= len(sets["vqa"].train) / SIZES["vqa"][0] <= 6  # ~4 questions per image
    assert len(sets["entailment"].train) == 6 * SIZES["entailment"][0]
    assert len(sets["reasoning"].train) == 4 * SIZES["reasoning"][0]
    assert all(ex.images[0] != ex.images[1] for ex in sets["reasoning"].train)


def test_load_data_dispatches_scene_specs(sets, monkeypatch):
    monkeypatch.setenv("DIDE_DATA_DIR", str(Path(sets["vqa"].meta["directory"]).parents[1]))
    data = load_data("scenes:train=400,test=200,seed=0", "vqa")
    assert data.train == sets["vqa"].train and data.labels == sets["vqa"].labels
    with pytest.raises(ValueError, match="bad scenes parameter 'size=3'"):
        load_data("scenes:size=3", "vqa")
    with pytest.raises(ValueError, match="train must be an integer"):
        load_data("scenes:train=many", "vqa")


# ---------------------------------------------------------------------------------------------------
# Exact labels on hand-checked scenes


def test_vqa_answers_on_a_hand_checked_scene():
    # red circle top-left, blue square top-right, red triangle bottom-left
    scene = [Shape("circle", "red", 0, 0), Shape("square", "blue", 0, 2), Shape("triangle", "red", 2, 0)]
    expected = {
        "what color is the square?": "blue",
        "what color is the circle?": "red",
        "which shape is blue?": "square",
        "which shape is red?": None,  # two red shapes: not asked
        "what shape is below the blue shape?": "triangle",
        "what shape is left of the blue shape?": None,  # two shapes are left of it
        "what shape is right of the red shape?": None,  # two red shapes
        "what color is the shape right of the circle?": "blue",
        "what color is the shape below the square?": "red",
        "what color is the shape above the triangle?": None,
        "is the red circle above the red triangle?": "yes",
        "is the red triangle left of the blue square?": "yes",
        "is the blue square left of the red circle?": "no",
        "is the green circle left of the blue square?": None,  # no green circle
        "how many red shapes are there?": "2",
        "how many circles are there?": "1",
        "how many yellow shapes are there?": "0",
    }
    assert {q: scene_language.VQA_QUESTIONS[q][1](scene) for q in expected} == expected


def test_entailment_labels_account_for_what_the_occluder_may_hide():
    # Visible: red circle (0,0), red square (1,1). Hidden under the occluder: cell (2,2), which
    # really holds a green circle, but the labels may only use what can be seen.
    scene = Scene(
        (Shape("circle", "red", 0, 0), Shape("square", "red", 1, 1), Shape("circle", "green", 2, 2)),
        hidden=((2, 2),),
    )
    expected = {
        "there are at least two red shapes.": "entailment",
        "there is at most one red shape.": "contradiction",
        "there are at least two circles.": "neutral",  # true here, but only because of the hidden one
        "there is at most one blue shape.": "entailment",  # one hidden cell holds at most one
        "there are at least two blue shapes.": "contradiction",
        "there are more red shapes than blue shapes.": "entailment",  # 2 > 0 + 1
        "there are more circles than squares.": "neutral",  # 1 vs 1, one cell unknown
        "a red circle is left of a red square.": "entailment",
        "a red square is left of a red circle.": "neutral",  # a red circle may be in column 2
        "a blue triangle is right of a green circle.": "contradiction",  # one hidden cell, two shapes
        "a blue triangle is above a red square.": "contradiction",  # the hidden cell is below row 1
        "a blue triangle is below a red square.": "neutral",
    }
    assert {t: entailment_label(t, scene) for t in expected} == expected

    two_hidden = Scene(scene.shapes, hidden=((2, 1), (2, 2)))
    expected = {
        "a blue triangle is right of a green circle.": "neutral",
        "a blue triangle is above a green circle.": "contradiction",  # both hidden cells in row 2
        "there is at most one blue shape.": "neutral",
        "there are more red shapes than blue shapes.": "neutral",  # 2 vs up to 2
        "there are at least two red shapes.": "entailment",
    }
    assert {t: entailment_label(t, two_hidden) for t in expected} == expected


def test_entailment_labels_equal_the_full_enumeration_of_hidden_cells():
    """entailment_label only tries shapes a statement mentions; check that against every filling."""
    rng = random.Random(5)
    texts = scene_language.ENTAILMENT_COUNTING + rng.sample(scene_language.ENTAILMENT_SPATIAL, 60)
    for _ in range(12):
        scene = scene_world.random_scene(rng, occluded=True)
        fillings = list(scene_language.completions(scene))
        assert len(fillings) == 13 ** len(scene.hidden)
        for text in texts:
            holds = {scene_language.ENTAILMENT_STATEMENTS[text][1](shapes) for shapes in fillings}
            full = "neutral" if len(holds) == 2 else ("entailment" if True in holds else "contradiction")
            assert entailment_label(text, scene) == full, (text, scene)


def test_reasoning_statements_on_a_hand_checked_pair():
    left = [Shape("circle", "red", 0, 0), Shape("square", "blue", 0, 1)]
    right = [Shape("circle", "red", 1, 1), Shape("triangle", "red", 2, 2)]
    expected = {
        "the left image has more red shapes than the right image.": False,
        "the left image has fewer red shapes than the right image.": True,
        "the two images have the same number of circles.": True,
        "there are exactly three red shapes in total.": True,
        "there are exactly two circles in total.": True,
        "both images contain a red circle.": True,
        "exactly one image contains a blue square.": True,
        "exactly one image contains a red circle.": False,
        "exactly one image has a circle left of a square.": True,
        "both images have a circle above a triangle.": False,
        "exactly one image has a circle above a triangle.": True,
    }
    assert {t: scene_language.REASONING_STATEMENTS[t][1](left, right) for t in expected} == expected
    # Each statement compares one fact per image: a count of what it names, or whether its relation holds.
    facts = {t: scene_language.pair_facts(t, left, right) for t in expected}
    assert facts["the left image has more red shapes than the right image."] == [1, 2]
    assert facts["there are exactly two circles in total."] == [1, 1]
    assert facts["exactly one image contains a blue square."] == [1, 0]
    assert facts["exactly one image has a circle above a triangle."] == [0, 1]


def test_reasoning_facts_come_from_the_cells_and_decide_every_label(sets):
    """The facts the loader derives from each image's cell labels (shapes_of_cells inverts cell_classes)
    give every statement's label back through its predicate, and use every class."""
    seen = Counter()
    for e in sets["reasoning"].train + sets["reasoning"].test:
        left, right = (scene_world.shapes_of_cells(c) for c in e.grid.cells)
        assert scene_language.REASONING_STATEMENTS[e.statement][1](left, right) == e.label
        assert list(e.grid.facts) == scene_language.pair_facts(e.statement, left, right)
        seen.update(e.grid.facts)
    assert set(seen) == set(range(scene_language.FACT_CLASSES))
    scene = scene_world.random_scene(random.Random(3))
    assert set(scene_world.shapes_of_cells(scene_world.cell_classes(scene))) == set(scene.shapes)
    assert all(e.grid.facts is None for e in sets["vqa"].train)


def test_rendered_shapes_are_large_distinct_and_the_occluder_hides_its_cells():
    scene = Scene(
        (Shape("circle", "red", 0, 0), Shape("triangle", "blue", 1, 2), Shape("square", "green", 2, 1)),
        hidden=((2, 1), (2, 2)),
    )
    rgb = np.asarray(render_scene(scene))
    assert rgb.shape == (64, 64, 3)
    for color, minimum in (("red", 100), ("blue", 60)):  # pixels: about one 8x8 patch's worth or more
        assert np.all(rgb == COLORS[color], axis=-1).sum() >= minimum
    # Each shape stays inside its 16x16 cell, which is one patch of the `mini` teacher.
    red = np.argwhere(np.all(rgb == COLORS["red"], axis=-1))
    assert red.min() >= 1 and red.max() <= 14
    # The hidden square leaves no green pixel; its cells are entirely occluder gray.
    assert not np.all(rgb == COLORS["green"], axis=-1).any()
    assert np.all(rgb[32:48, 16:48] == OCCLUDER)


def test_grid_labels_say_what_each_cell_shows_and_which_cells_the_text_names():
    scene = Scene(
        (Shape("circle", "red", 0, 0), Shape("square", "blue", 0, 3), Shape("circle", "green", 3, 1)),
        hidden=((3, 1),),
    )
    cells = scene_world.cell_classes(scene)
    assert len(cells) == scene_world.GRID**2 == 16
    assert cells[0] == 1 + scene_world.COLORED_SHAPES.index(("red", "circle"))
    assert cells[3] == 1 + scene_world.COLORED_SHAPES.index(("blue", "square"))
    assert cells[13] == scene_world.OCCLUDED_CELL  # the green circle is hidden: the class is the occluder's
    assert sum(c != 0 for c in cells) == 3
    # Subject and object of a relation are told apart; a hidden shape is never named.
    named = scene_world.named_cells(scene, (("red", "circle"), ("blue", "square")))
    assert named[0] == 1 and named[3] == 2 and sum(named) == 3
    assert scene_world.named_cells(scene, ((None, "circle"),)) == [1] + [0] * 15
    for text in ("is the red circle left of the blue square?", "how many circles are there?"):
        assert scene_language.VQA_QUESTIONS[text][2]  # every catalogue text knows what it names


# ---------------------------------------------------------------------------------------------------
# Determinism and the cache


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("task", ["vqa", "entailment", "reasoning", "itm"])
def test_same_seed_gives_identical_files(tmp_path, task):
    a = build_scenes(task, 6, 3, 7, tmp_path / "a")
    b = build_scenes(task, 6, 3, 7, tmp_path / "b")
    c = build_scenes(task, 6, 3, 8, tmp_path / "c")
    assert tree(a) == tree(b)
    assert tree(a) != tree(c)
    assert len([p for p in tree(a) if p.endswith(".png")]) == 9


def test_the_cache_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("DIDE_DATA_DIR", str(tmp_path))
    first = load_scenes("reasoning", train=5, test=3, seed=1)
    directory = Path(first.meta["directory"])
    assert directory.parent == tmp_path / "scenes"
    assert directory.stat().st_mode & 0o777 == 0o755
    stamps = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in directory.rglob("*")}
    second = load_scenes("reasoning", train=5, test=3, seed=1)
    assert second.train == first.train and second.test == first.test
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in directory.rglob("*")} == stamps
    assert [p.name for p in (tmp_path / "scenes").iterdir()] == [directory.name]  # no temp dirs left
    assert isinstance(first.train[0], ReasoningExample)


def test_an_interrupted_build_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    monkeypatch.setenv("DIDE_DATA_DIR", str(tmp_path))
    calls = 0

    def render_then_die(scene):
        nonlocal calls
        calls += 1
        if calls > 4:
            raise KeyboardInterrupt
        return render_scene(scene)

    with monkeypatch.context() as m:
        m.setattr(scenes, "render_scene", render_then_die)
        with pytest.raises(KeyboardInterrupt):
            load_scenes("entailment", train=6, test=3, seed=0)
    assert list((tmp_path / "scenes").iterdir()) == []
    # A temp directory left by a SIGKILL is ignored; a complete build happens.
    (tmp_path / "scenes" / f".entailment-train6-test3-seed0-v{scenes.VERSION}.abc123").mkdir()
    data = load_scenes("entailment", train=6, test=3, seed=0)
    assert len(data.train) == 6 * scene_splits.STATEMENTS_PER_LABEL * len(ENTAILMENT_LABELS) and all(
        ex.image.is_file() for ex in data.train
    )


def test_a_final_directory_without_its_marker_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DIDE_DATA_DIR", str(tmp_path))
    (tmp_path / "scenes" / f"vqa-train2-test1-seed0-v{scenes.VERSION}").mkdir(parents=True)
    with pytest.raises(ValueError, match="not a complete scenes directory"):
        load_scenes("vqa", train=2, test=1)


def test_a_pairs_cache_from_before_pairs_carried_cell_labels_is_refused_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("DIDE_DATA_DIR", str(tmp_path))
    directory = Path(load_scenes("itm", train=2, test=1).meta["directory"])
    records = [json.loads(line) for line in (directory / "train.jsonl").read_text().splitlines()]
    assert all(len(r["cells"]) == len(r["named"]) == 1 for r in records)
    old = [{k: v for k, v in r.items() if k not in ("cells", "named")} for r in records]  # as written before
    (directory / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    with pytest.raises(ValueError, match=rf"{re.escape(str(directory))} holds image-text pairs without cell labels: "
                       "delete it and rerun"):  # fmt: skip
        load_scenes("itm", train=2, test=1)


def test_bad_scene_requests_are_rejected(tmp_path, monkeypatch):
    monkeypatch.setenv("DIDE_DATA_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="choose one of vqa, entailment, reasoning"):
        load_scenes("captioning")
    with pytest.raises(ValueError, match="need train and test >= 2"):
        load_scenes("reasoning", train=1, test=1)
