"""Synthetic shape scenes (seeded, drawn with Pillow) for VQA, entailment, NLVR2-style reasoning and
image-text matching: generated on first use into a cache directory, and loaded from it.

The world is in `scene_world.py`, the drawing in `scene_render.py`, the texts in `scene_language.py` and
`scene_captions.py`, the balanced splits in `scene_splits.py`."""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path

from tqdm import tqdm

from core.atomic import atomic_directory
from training.examples import (
    ENTAILMENT_LABELS,
    ITM_LABELS,
    REASONING_LABELS,
    EntailmentExample,
    GridLabels,
    GridSpec,
    PairExample,
    ReasoningExample,
    TaskData,
    VQAExample,
)
from training.scene_language import (
    ENTAILMENT_STATEMENTS,
    REASONING_STATEMENTS,
    VQA_LABELS,
    VQA_QUESTIONS,
    pair_facts,
)
from training.scene_render import render_scene
from training.scene_splits import make_split
from training.scene_world import (
    CELL_CLASSES,
    GRID,
    NAMED_CLASSES,
    Description,
    cell_classes,
    named_cells,
    shapes_of_cells,
)

logger = logging.getLogger(__name__)

# Bump when the generator (any of the scene_*.py modules) changes what it draws or asks, so old caches
# are not reused. Image-text matching pairs gained their cell labels within v3, so that the other tasks' caches
# (the same files as before) stay valid; a pairs cache from before is refused by _read_split, naming it.
VERSION = 3

# Images rendered per split: (train, test). Each VQA image gets up to 6 questions (~3.6 on average:
# ~72,000 / ~3,600), each entailment image 2 hypotheses per label (72,000 / 6,000), and each
# reasoning image is the left image of one pair and the right image of another, with 2 true and 2
# false statements per pair (64,000 / 4,000, each with two images); each image-text matching image
# one caption with its hard negatives (6,000 / 1,000). A from-scratch teacher needs this many scenes
# to learn relations rather than memorise a few thousand.
DEFAULT_SIZES = {"vqa": (20000, 1000), "entailment": (12000, 1000), "reasoning": (16000, 1000), "itm": (6000, 1000)}


def data_dir() -> Path:
    """Where generated data is cached: $DIDE_DATA_DIR, default ~/.cache/dide."""
    return Path(os.environ.get("DIDE_DATA_DIR") or Path.home() / ".cache" / "dide")


def _mentions(task: str, text: str) -> tuple[Description, ...]:
    catalogue = {"vqa": VQA_QUESTIONS, "entailment": ENTAILMENT_STATEMENTS, "reasoning": REASONING_STATEMENTS}
    return catalogue[task][text][2]


def _write_split(task: str, n_images: int, rng: random.Random, out: Path, split: str) -> None:
    """Render one split's images to out/split/NNNNN.png and its examples to out/split.jsonl."""
    scenes, records = make_split(task, n_images, rng)
    (out / split).mkdir()
    for i, scene in enumerate(tqdm(scenes, desc=f"rendering {split}", unit="img", disable=None)):
        render_scene(scene).save(out / split / f"{i:05d}.png")
    with open(out / f"{split}.jsonl", "w") as f:
        for r in records:
            indices = r.get("images", [r.get("image")])
            r["cells"] = [cell_classes(scenes[i]) for i in indices]
            if task != "itm":  # an itm record has its caption's already (scene_splits: from the Caption)
                mentions = _mentions(task, r.get("question") or r.get("hypothesis") or r["statement"])
                r["named"] = [named_cells(scenes[i], mentions) for i in indices]
            if "images" in r:
                r["images"] = [f"{split}/{i:05d}.png" for i in r["images"]]
            else:
                r["image"] = f"{split}/{r['image']:05d}.png"
            f.write(json.dumps(r) + "\n")


class _BuiltConcurrently(Exception):
    """Another process finished the same scenes first: keep its copy."""


def build_scenes(task: str, train: int, test: int, seed: int, root: Path) -> Path:
    """Render the dataset into `root` unless it is there already; returns its directory.

    Built with core.atomic.atomic_directory, so an interrupted build never leaves a directory that looks
    complete."""
    final = root / f"{task}-train{train}-test{test}-seed{seed}-v{VERSION}"
    if final.is_dir():
        if not (final / "meta.json").is_file():
            raise ValueError(f"{final} is not a complete scenes directory (no meta.json): delete it and rerun")
        return final
    logger.info("generating %s scenes (%d train / %d test images) into %s", task, train, test, final)

    def write(tmp: Path) -> None:
        for split, n in (("train", train), ("test", test)):
            # String seeds are hashed deterministically (not with PYTHONHASHSEED).
            _write_split(task, n, random.Random(f"scenes/{task}/{seed}/{split}"), tmp, split)
        meta = {"task": task, "train": train, "test": test, "seed": seed, "version": VERSION}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        if (final / "meta.json").is_file():  # e.g. the other torchrun ranks: one identical copy, never swapped
            raise _BuiltConcurrently

    try:
        atomic_directory(final, write)
    except _BuiltConcurrently:
        logger.info("%s was built concurrently; using that copy", final)
    return final


def _read_split(directory: Path, task: str, split: str) -> list:
    examples = []
    with open(directory / f"{split}.jsonl") as f:
        for line in f:
            r = json.loads(line)
            if "cells" not in r:  # pairs written before they carried labels (the other tasks always had them)
                raise ValueError(f"{directory} holds image-text pairs without cell labels: delete it and rerun")
            shapes = [shapes_of_cells(c) for c in r["cells"]] if task == "reasoning" else None
            facts = pair_facts(r["statement"], *shapes) if shapes else None
            grid = GridLabels.of(r["cells"], r["named"], facts)
            if task == "vqa":
                kind = VQA_QUESTIONS[r["question"]][0]
                examples.append(
                    VQAExample(directory / r["image"], r["question"], {r["answer"]: 1.0}, grid=grid, kind=kind)
                )
            elif task == "entailment":
                kind = ENTAILMENT_STATEMENTS[r["hypothesis"]][0]
                examples.append(
                    EntailmentExample(directory / r["image"], r["hypothesis"], r["label"], grid=grid, kind=kind)
                )
            elif task == "itm":
                examples.append(PairExample(directory / r["image"], r["caption"], tuple(r["negatives"]), grid=grid))
            else:
                left, right = (directory / p for p in r["images"])
                kind = REASONING_STATEMENTS[r["statement"]][0]
                examples.append(
                    ReasoningExample((left, right), r["statement"], r["label"] == "True", grid=grid, kind=kind)
                )
    return examples


def load_scenes(task: str, *, train: int | None = None, test: int | None = None, seed: int = 0) -> TaskData:
    """The synthetic scenes for `task` ("vqa", "entailment", "reasoning" or "itm"), generated on first use
    and cached under data_dir()/scenes; `train` / `test` count rendered images (DEFAULT_SIZES)."""
    if task not in DEFAULT_SIZES:
        raise ValueError(f"unknown task {task!r} for scenes: choose one of {', '.join(DEFAULT_SIZES)}")
    train = DEFAULT_SIZES[task][0] if train is None else train
    test = DEFAULT_SIZES[task][1] if test is None else test
    least = 2 if task == "reasoning" else 1  # a reasoning pair needs two different images
    if train < least or test < least:
        raise ValueError(f"scenes for {task} need train and test >= {least} images, got train={train}, test={test}")
    directory = build_scenes(task, train, test, seed, data_dir() / "scenes")
    labels = {
        "vqa": list(VQA_LABELS),
        "entailment": list(ENTAILMENT_LABELS),
        "reasoning": list(REASONING_LABELS),
        "itm": list(ITM_LABELS),
    }
    return TaskData(
        task=task,
        labels=labels[task],
        train=_read_split(directory, task, "train"),
        test=_read_split(directory, task, "test"),
        name="scenes",
        meta={"train_images": train, "test_images": test, "seed": seed, "directory": str(directory)},
        grid=GridSpec(GRID, CELL_CLASSES, NAMED_CLASSES),
    )
