"""The demo's shipped models (`service/demo_models/`): models.json, its one writer and reader, and the check
that each task's bundle is the one it records.

The folder holds one bundle per task, exactly as `dide-export` wrote it, and models.json, which records per
task the sha256 of the bundle's manifest (the manifest in turn holds every other file's sha256, checked by
core.bundle.read_bundle), the teacher's and student's test accuracy, the data, the commands that built it
and the demo's examples. `dide-demo rebuild` writes the folder; `dide-demo` reads it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

from core.atomic import atomic_directory
from core.bundle import MANIFEST, BundleError, read_bundle

MODELS_DIR = Path(__file__).resolve().parent / "demo_models"
MODELS_JSON = "models.json"
TASKS = ("vqa", "entailment", "reasoning")
FORMAT = 1
REBUILD = "dide-demo rebuild"


class ShippedModelsError(RuntimeError):
    """The shipped demo models are missing, or differ from what models.json records (the message says which)."""


def manifest_sha256(bundle: Path) -> str:
    return hashlib.sha256((bundle / MANIFEST).read_bytes()).hexdigest()


def write_models(directory: Path, bundles: dict[str, Path], record: dict, after: Callable[[Path], None]) -> None:
    """Replace `directory` atomically with a copy of each task's bundle and models.json.

    `record` is models.json less each task's manifest sha256 and model_id, which are taken from the copies;
    `after(tmp)` runs on the written folder before it is swapped in (to check it as a reader would)."""
    record = json.loads(json.dumps(record))  # a copy; and every value must be JSON

    def write(tmp: Path) -> None:
        for task, bundle in bundles.items():
            shutil.copytree(bundle, tmp / task)
            entry = record["tasks"][task]
            entry["manifest_sha256"] = manifest_sha256(tmp / task)
            entry["model_id"] = json.loads((tmp / task / MANIFEST).read_text())["model_id"]
        (tmp / MODELS_JSON).write_text(json.dumps({"format": FORMAT, **record}, indent=2) + "\n")
        after(tmp)

    atomic_directory(directory, write)


def read_models(directory: Path = MODELS_DIR) -> dict:
    """models.json, once every task's bundle is checked against it; ShippedModelsError saying what to do otherwise."""
    path = directory / MODELS_JSON
    restore = f"restore the shipped folder (`git checkout -- {directory}`) or rebuild it (`{REBUILD}`)"
    try:
        models = json.loads(path.read_text())
    except FileNotFoundError:
        raise ShippedModelsError(f"no demo models at {directory} ({MODELS_JSON} not found): {restore}") from None
    except (OSError, ValueError) as e:
        raise ShippedModelsError(f"{path} cannot be read ({e}): {restore}") from None
    if not isinstance(models, dict) or models.get("format") != FORMAT or not isinstance(models.get("tasks"), dict):
        raise ShippedModelsError(f"{path} is not a format-{FORMAT} demo models file: {restore}")
    missing = [t for t in TASKS if t not in models["tasks"]]
    if missing:
        raise ShippedModelsError(f"{path} has no {', '.join(missing)} model: {restore}")
    for task in TASKS:
        entry = models["tasks"][task]
        bundle = directory / task
        try:
            got = manifest_sha256(bundle)
        except OSError as e:
            raise ShippedModelsError(f"{bundle / MANIFEST} cannot be read ({e.strerror}): {restore}") from None
        if got != entry["manifest_sha256"]:
            raise ShippedModelsError(
                f"{bundle / MANIFEST} has sha256 {got[:16]}…, but {MODELS_JSON} records "
                f"{entry['manifest_sha256'][:16]}… for the {task} model: the bundle was altered or replaced; {restore}"
            )
        try:
            read_bundle(bundle)  # every file against the manifest's sha256
        except BundleError as e:
            raise ShippedModelsError(f"the shipped {task} model is damaged: {e}; {restore}") from None
    return models
