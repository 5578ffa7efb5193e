"""The one place that turns a --data spec ("easy-vqa", "scenes", "vqav2:DIR", "coco:FILE", ...) into a dataset."""

from __future__ import annotations

from pathlib import Path

from training.easy_vqa import load_easy_vqa, load_easy_vqa_pairs
from training.examples import TASKS, TaskData
from training.nlvr2 import load_nlvr2
from training.pairs import load_coco, load_pair_file
from training.scenes import load_scenes
from training.snli_ve import load_snli_ve
from training.vqav2 import load_vqav2

# Each dataset and the tasks it has.
DATASETS = {
    "easy-vqa": ("vqa", "itm"),
    "scenes": TASKS,
    "vqav2": ("vqa",),
    "snli-ve": ("entailment",),
    "nlvr2": ("reasoning",),
    "coco": ("itm",),
    "pairs": ("itm",),
}
SPEC_FORMS = {
    "easy-vqa": "easy-vqa",
    "scenes": "scenes[:train=N,test=N,seed=N]",
    "vqav2": "vqav2:DIR",
    "snli-ve": "snli-ve:DIR",
    "nlvr2": "nlvr2:DIR",
    "coco": "coco:CAPTIONS_JSON[,images=DIR]",
    "pairs": "pairs:FILE.tsv|FILE.jsonl",
}
DIRECTORY_LOADERS = {"vqav2": load_vqav2, "snli-ve": load_snli_ve, "nlvr2": load_nlvr2}
SCENE_PARAMETERS = ("train", "test", "seed")


def load_data(spec: str, task: str) -> TaskData:
    """The dataset named by `spec` for `task` ("vqa", "entailment", "reasoning" or "itm")."""
    name, _, arg = spec.partition(":")
    if name not in DATASETS:
        raise ValueError(f"unknown data {spec!r}: use one of {', '.join(SPEC_FORMS.values())}")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    if task not in DATASETS[name]:
        fitting = [SPEC_FORMS[n] for n, tasks in DATASETS.items() if task in tasks]
        raise ValueError(
            f"{name} has no {task!r} task (only {', '.join(DATASETS[name])}); "
            f"for {task} use one of: {', '.join(fitting)}"
        )
    if name == "easy-vqa":
        if arg:
            raise ValueError(f"easy-vqa takes no parameters, got {spec!r}: use --data easy-vqa")
        return load_easy_vqa_pairs() if task == "itm" else load_easy_vqa()
    if name == "scenes":
        return load_scenes(task, **_scene_parameters(arg))
    if name in ("coco", "pairs"):
        if not arg:
            raise ValueError(f"{name} needs its file: use --data {SPEC_FORMS[name]}")
        return load_coco(*_coco_parameters(arg)) if name == "coco" else load_pair_file(Path(arg).expanduser())
    if not arg:
        raise ValueError(f"{name} needs its data directory: use --data {name}:/path/to/{name}")
    root = Path(arg).expanduser()
    if not root.is_dir():
        raise ValueError(f"{name}: {root} is not a directory; use --data {name}:/path/to/{name}")
    return DIRECTORY_LOADERS[name](root)


def _scene_parameters(arg: str) -> dict[str, int]:
    """Parse "train=3000,test=600,seed=0" into {"train": 3000, "test": 600, "seed": 0}."""
    params: dict[str, int] = {}
    for item in filter(None, arg.split(",")):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in SCENE_PARAMETERS:
            raise ValueError(f"bad scenes parameter {item!r}: use {SPEC_FORMS['scenes']}, each part optional")
        try:
            params[key] = int(value)
        except ValueError:
            raise ValueError(f"bad scenes parameter {item!r}: {key} must be an integer") from None
    return params


def _coco_parameters(arg: str) -> tuple[Path, Path | None]:
    """Parse "CAPTIONS_JSON[,images=DIR]" into the captions file and the image directory (or None)."""
    captions, _, rest = arg.partition(",")
    images = None
    if rest:
        key, eq, value = rest.partition("=")
        if key.strip() != "images" or not eq or not value.strip():
            raise ValueError(f"bad coco parameter {rest!r}: use {SPEC_FORMS['coco']}")
        images = Path(value.strip()).expanduser()
    return Path(captions).expanduser(), images
