"""A scenes task's test split as the demo serves it: its images named by task-prefixed ids, its examples as JSON.

    python -m training.demo_split --task vqa --test 1000 --seed 0 --out DIR

DIR/images/vqa-00012.png is test image 00012 of `load_scenes("vqa", test=1000, seed=0)`, and DIR/examples.jsonl
holds one {"images": [ids], "text": ..., "answer": label} per test example (a reasoning answer is "True" or
"False"). Each split is drawn from its own seed, so the two-image train split rendered alongside leaves the test
split exactly the one the demo models were evaluated on. No torch: `dide-demo` runs this before serving.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

from core.atomic import atomic_directory
from training.examples import EntailmentExample, ReasoningExample, VQAExample, images_of, text_of
from training.scenes import load_scenes

log = logging.getLogger(__name__)

TASKS = ("vqa", "entailment", "reasoning")
TINY_TRAIN = 2  # the fewest train images every task accepts (a reasoning pair needs two)
META = "meta.json"
EXAMPLES = "examples.jsonl"
IMAGES = "images"


def image_id(task: str, path: Path) -> str:
    """The demo's id of a test image: the task, then the file's stem ("vqa-00012")."""
    return f"{task}-{path.stem}"


def answer_of(example: VQAExample | EntailmentExample | ReasoningExample) -> str:
    if isinstance(example, VQAExample):
        return max(example.answers, key=example.answers.__getitem__)
    if isinstance(example, EntailmentExample):
        return example.label
    return str(example.label)


def write_split(task: str, test: int, seed: int, out: Path) -> Path:
    """Write `task`'s test split (`test` images, `seed`) into `out` unless it holds that split already."""
    meta = {"task": task, "test": test, "seed": seed}
    if (out / META).is_file() and json.loads((out / META).read_text()) == meta:
        return out
    data = load_scenes(task, train=TINY_TRAIN, test=test, seed=seed)

    def write(tmp: Path) -> None:
        (tmp / IMAGES).mkdir()
        linked: set[Path] = set()
        with open(tmp / EXAMPLES, "w") as f:
            for ex in data.test:
                paths = images_of(ex)
                for p in paths:
                    if p not in linked:
                        link_or_copy(p, tmp / IMAGES / f"{image_id(task, p)}{p.suffix}")
                        linked.add(p)
                record = {"images": [image_id(task, p) for p in paths], "text": text_of(ex), "answer": answer_of(ex)}
                f.write(json.dumps(record) + "\n")
        (tmp / META).write_text(json.dumps(meta) + "\n")

    atomic_directory(out, write)
    log.info("%s: %d test examples over %d images in %s", task, len(data.test), test, out)
    return out


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (the scenes cache and the demo folder are usually on one file system), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.demo_split", description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=TASKS, required=True, help="which scenes task")
    p.add_argument("--test", type=int, required=True, help="test images of the split (as the models' --data)")
    p.add_argument("--seed", type=int, default=0, help="scenes seed (as the models' --data)")
    p.add_argument("--out", required=True, help="directory to write (replaced atomically)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    write_split(args.task, args.test, args.seed, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
