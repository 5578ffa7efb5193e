"""`dide-demo`: serve the shipped demo models (service/demo_models/) on their scenes test images, or rebuild them.

    dide-demo                 # check the shipped models, cache their test images under artifacts/demo, serve
    dide-demo build --root D  # only prepare D (bundles, test images, store): the compose one-shot job runs this
    dide-demo rebuild         # teachers, DiDE students, evaluation and bundles from scratch into service/demo_models
    dide-demo rebuild --scale small --models D --work W   # every step at a tiny scale (what CI runs)

Training, evaluation and export run as subprocesses (`dide-train`, `dide-export`), as do the scenes test split
(`training.demo_split`) and the cache build (`dide-cache`), so `dide-demo` itself never imports torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from core.atomic import atomic_directory
from core.bundle import MANIFEST
from export.runtime import Bundle
from export.store import EmbeddingStore, StoreError, content_key
from service.demo_examples import choose_examples, demo_text, expected_value, predict, read_split
from service.shipped import MODELS_DIR, REBUILD, ShippedModelsError, manifest_sha256, read_models, write_models

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    """How one demo model is built: its scenes (rendered images per split) and the teacher's and student's flags."""

    train: int
    test: int
    teacher: str
    student: str
    seed: int = 0

    @property
    def data(self) -> str:
        return f"scenes:train={self.train},test={self.test},seed={self.seed}"


# The recipe, one per task: `dide-demo rebuild` trains exactly this; models.json records what it was.
# Teachers: `mini` ViLTs from scratch with the auxiliary grid losses (training/grid.py; for reasoning also
# each image's fact, read from its pooled output), the recipe that made the scenes learnable (README,
# Results); students: DiDE with the default weights (prediction and attention KD, both directions), on the
# teacher's own unshifted images (a 4-pixel shift moves a shape across the 16-pixel patches the teacher never
# saw it straddle), with the product fusion (the paper's concat head does not learn these tasks even from
# perfect embeddings: bench/fusion_oracle.py) and the scene probe on the pooled image embedding
# (training/grid.py), without dropout for a short schedule. The reasoning student gets 5 epochs: it sits at
# chance through its first, and after 3 it was still 8 points under its teacher (README, Results).
_TEACHER = (
    "--size mini --batch-size 64 --lr 1e-3 --dropout 0 --augment none --grid-loss 1 --threads 1"
    " --eval-every 1 --eval-limit 1000 --log-every 200"
)


def _student(epochs: int) -> str:
    return (
        f"--epochs {epochs} --batch-size 64 --dropout 0 --augment none --fusion product --grid-loss 1 --threads 1"
        " --eval-every 1 --eval-limit 1000 --log-every 200"
    )


VQA = Recipe(train=20000, test=1000, teacher=f"{_TEACHER} --epochs 3", student=_student(3))
ENTAILMENT = Recipe(train=12000, test=1000, teacher=f"{_TEACHER} --epochs 3", student=_student(3))
REASONING = Recipe(train=16000, test=1000, teacher=f"{_TEACHER} --epochs 3", student=_student(5))
RECIPES = {"vqa": VQA, "entailment": ENTAILMENT, "reasoning": REASONING}
# `--scale small`: every step of the rebuild on a few images with a tiny teacher, so that CI can run it from scratch.
SMALL = Recipe(
    train=6,
    test=4,
    teacher="--size tiny --epochs 1 --batch-size 16 --dropout 0 --augment none --grid-loss 1",
    student="--epochs 1 --batch-size 16 --dropout 0 --augment none --fusion product --grid-loss 1",
)


class DemoError(RuntimeError):
    """A demo step cannot go on (the message says why and what to do)."""


def python_m(argv: list[str], capture: bool = False) -> str:
    """Run `python -m argv` with this interpreter (so no installed script is needed); its stdout if captured."""
    done = subprocess.run([sys.executable, "-m", *argv], check=True, stdout=subprocess.PIPE if capture else None)
    return done.stdout.decode() if capture else ""


def shown(argv: list[str]) -> str:
    """A step as its installed command: `dide-train teacher ...`."""
    scripts = {"training.train": "dide-train", "export.onnx_export": "dide-export"}
    return " ".join([scripts.get(argv[0], f"python -m {argv[0]}"), *argv[1:]])


def step(name: str, output: Path, argv: list[str]) -> None:
    """Run a build step unless `output` exists from the same command (its argv is kept beside it)."""
    stamp = output.with_name(output.name + ".argv.json")
    if output.exists() and stamp.is_file() and json.loads(stamp.read_text()) == argv:
        log.info("%s: %s exists from the same command, kept", name, output)
        return
    shutil.rmtree(output, ignore_errors=True)
    log.info("%s: %s", name, shown(argv))
    t0 = time.time()
    python_m(argv)
    stamp.write_text(json.dumps(argv) + "\n")
    log.info("%s: done in %.0f s", name, time.time() - t0)


def eval_accuracy(model: Path) -> float:
    result = json.loads(python_m(["training.train", "eval", "--model", str(model)], capture=True).splitlines()[-1])
    return float(result["accuracy"])


def split_images(split: Path) -> Callable[[str], Path]:
    """Where a test split written by training.demo_split keeps the file of each image id."""
    return lambda image_id: split / "images" / f"{image_id}.png"


def write_test_split(task: str, test: int, seed: int, out: Path) -> Path:
    """`task`'s scenes test split (`test` images, `seed`) as the demo serves it, in `out` (training.demo_split)."""
    python_m(["training.demo_split", "--task", task, "--test", str(test), "--seed", str(seed), "--out", str(out)])
    return out


def build_task(task: str, recipe: Recipe, work: Path) -> tuple[Path, dict]:
    """One task's teacher, student and bundle under `work`, and its models.json entry."""
    teacher, student, bundle = work / "teacher", work / "student", work / "bundle"
    teach = ["training.train", "teacher", "--task", task, "--data", recipe.data, "--out", str(teacher)]
    teach += recipe.teacher.split()
    distil = ["training.train", "distill", "--task", task, "--teacher", str(teacher), "--out", str(student)]
    distil += recipe.student.split()
    export = ["export.onnx_export", "--student", str(student), "--out", str(bundle)]
    step(f"{task} teacher", teacher, teach)
    step(f"{task} student", student, distil)
    step(f"{task} bundle", bundle, export)
    split = write_test_split(task, recipe.test, recipe.seed, work / "test-split")
    examples = read_split(split / "examples.jsonl")
    predictions = predict(Bundle.load(bundle), examples, split_images(split))
    right = sum(p == expected_value(task, e.answer) for (p, _), e in zip(predictions, examples, strict=True))
    entry = {
        "data": recipe.data,
        "test_split": {"test": recipe.test, "seed": recipe.seed, "examples": len(examples)},
        "teacher": {"command": shown(teach), "test_accuracy": eval_accuracy(teacher)},
        # The student's answers through its bundle, computed as the service computes them.
        "student": {"command": shown(distil), "test_accuracy": right / len(examples)},
        "export": {"command": shown(export)},
        "examples": choose_examples(task, examples, predictions),
    }
    log.info("%s: %s", task, json.dumps({k: v for k, v in entry.items() if k != "examples"}))
    return bundle, entry


def rebuild(models_dir: Path, work: Path, scale: str, jobs: int = 1) -> dict:
    """Train, distil, evaluate and export each task's model from scratch (`jobs` tasks at a time); write
    `models_dir` atomically."""
    t0 = time.time()
    recipes = {task: SMALL if scale == "small" else recipe for task, recipe in RECIPES.items()}
    with ThreadPoolExecutor(jobs) as pool:
        built = dict(zip(recipes, pool.map(lambda t: build_task(t, recipes[t], work / t), recipes), strict=True))
    record = {
        "scale": scale,
        "command": REBUILD + (" --scale small" if scale == "small" else ""),
        "built": time.strftime("%Y-%m-%d"),
        "tasks": {task: entry for task, (_, entry) in built.items()},
    }
    write_models(models_dir, {task: bundle for task, (bundle, _) in built.items()}, record, after=read_models)
    log.info("rebuilt the demo models into %s in %.0f s", models_dir, time.time() - t0)
    return read_models(models_dir)


def copy_bundle(src: Path, dst: Path, sha256: str) -> None:
    """`dst` as a copy of the shipped bundle, unless it is one already."""
    if (dst / MANIFEST).is_file() and manifest_sha256(dst) == sha256:
        return
    atomic_directory(dst, lambda tmp: [shutil.copy2(p, tmp / p.name) for p in src.iterdir() if p.is_file()])


def cached_ids(store_root: Path, model_id: str) -> dict[str, str]:
    try:
        return EmbeddingStore.open(store_root, model_id, None).user_ids()
    except StoreError:
        return {}


def cache_images(bundle: Path, images: Path, store_root: Path, model_id: str) -> None:
    """Embed the images into the store with their stems as ids, unless every id already names its image."""
    want = {p.stem: content_key(p.read_bytes()) for p in images.iterdir()}
    if all(cached_ids(store_root, model_id).get(i) == sha for i, sha in want.items()):
        return
    python_m(["export.cache_cli", "build", "--bundle", str(bundle), "--images", str(images), "--store",
              str(store_root)])  # fmt: skip
    have = cached_ids(store_root, model_id)
    wrong = sorted(i for i, sha in want.items() if have.get(i) != sha)
    if wrong:
        raise DemoError(
            f"{store_root / model_id} maps {len(wrong)} demo ids (e.g. {wrong[0]}) to other images: "
            f"delete {store_root} and run dide-demo again"
        )


def demo_images(root: Path) -> Callable[[str], Path]:
    """Where the file of each demo image id ("vqa-00012") is under `root`."""
    return lambda image_id: split_images(root / "split" / image_id.rsplit("-", 1)[0])(image_id)


def prepare(root: Path, models_dir: Path, models: dict) -> list[Path]:
    """The verified shipped bundles copied under root/bundles, and each task's test images written under
    root/split and cached in root/store by id; the bundles."""
    t0 = time.time()
    bundles = []
    for task, entry in models["tasks"].items():
        bundle = root / "bundles" / task
        copy_bundle(models_dir / task, bundle, entry["manifest_sha256"])
        split = write_test_split(task, entry["test_split"]["test"], entry["test_split"]["seed"], root / "split" / task)
        cache_images(bundle, split / "images", root / "store", entry["model_id"])
        bundles.append(bundle)
    log.info("demo ready under %s (%.1f s)", root, time.time() - t0)
    return bundles


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dide-demo", description=__doc__.split("\n")[0])
    p.add_argument(
        "command",
        nargs="?",
        choices=("serve", "build", "rebuild"),
        default="serve",
        help="serve (default), build (prepare --root only) or rebuild (train the models from scratch)",
    )
    p.add_argument("--models", default=str(MODELS_DIR), help="the demo models folder to serve, or to write (rebuild)")
    p.add_argument("--root", default="artifacts/demo", help="where the served bundles, test images and store are kept")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on")
    p.add_argument("--port", type=int, default=8000, help="port to serve on")
    p.add_argument("--scale", choices=("full", "small"), default="full", help="rebuild: the recipe, or a tiny run")
    p.add_argument("--work", default="artifacts/demo-rebuild", help="rebuild: where runs are kept (resumable)")
    p.add_argument("--jobs", type=int, default=1, help="rebuild: tasks built at once")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    models_dir, root = Path(args.models).resolve(), Path(args.root).resolve()
    try:
        if args.command == "rebuild":
            rebuild(models_dir, Path(args.work), args.scale, args.jobs)
            return 0
        models = read_models(models_dir)
        bundles = prepare(root, models_dir, models)
    except subprocess.CalledProcessError as e:
        log.error("demo step failed (exit %d): %s", e.returncode, shown(list(map(str, e.cmd[2:]))))
        return 1
    except (ShippedModelsError, DemoError) as e:
        log.error("%s", e)
        return 1
    if args.command == "build":
        return 0
    os.environ["DIDE_BUNDLES"] = ",".join(str(b) for b in bundles)
    os.environ["DIDE_STORE"] = str(root / "store")
    print("\n" + demo_text(models, f"http://{args.host}:{args.port}", demo_images(root)) + "\n", flush=True)
    from service.app import main as serve

    return serve(["--host", args.host, "--port", str(args.port)])


if __name__ == "__main__":
    sys.exit(main())
