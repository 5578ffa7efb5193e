"""`dide-demo`: build the demo models, bundles and image store if missing, then serve them.

    dide-demo                  # build what is missing under artifacts/demo, then serve on 127.0.0.1:8000
    dide-demo build --root D   # only build (the compose one-shot job runs this)

Every build step runs as a subprocess (`dide-train`, `dide-export`, `dide-cache`) whose output is written
atomically, so an interrupted build resumes at the first missing step and serving never imports torch.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# The demo recipe is sized to build in under 15 minutes on 2 CPU cores; the README's results table uses
# longer runs (see `bench/accuracy.py`).
FAST = ["--size", "mini", "--epochs", "2", "--batch-size", "64", "--log-every", "100"]
DISTILL = ["--epochs", "1", "--batch-size", "64", "--log-every", "100"]
SCENES = "scenes:train=1500,test=300,seed=0"


@dataclass(frozen=True)
class DemoModel:
    task: str
    data: str
    teacher_flags: tuple[str, ...]


MODELS = (
    DemoModel("vqa", "easy-vqa", ("--augment", "flip")),
    DemoModel("entailment", SCENES, ()),
    DemoModel("reasoning", SCENES, ()),
)


def step(name: str, output: Path, argv: list[str]) -> None:
    """Run one build step unless its (atomically written) output already exists."""
    if output.exists():
        log.info("%s: %s exists, skipped", name, output)
        return
    log.info("%s: %s", name, " ".join(argv))
    t0 = time.time()
    subprocess.run([sys.executable, "-m", *argv], check=True)
    log.info("%s: done in %.0fs", name, time.time() - t0)


def easy_vqa_test_images() -> Path:
    import easy_vqa

    return Path(next(iter(easy_vqa.get_test_image_paths().values()))).parent


def build(root: Path) -> list[Path]:
    """Teachers, DiDE students and bundles for the three tasks; the easy-VQA test images cached for each."""
    t0 = time.time()
    bundles = []
    for m in MODELS:
        runs = root / "runs" / m.task
        teacher, student, bundle = runs / "teacher", runs / "student", root / "bundles" / m.task
        step(f"{m.task} teacher", teacher, ["training.train", "teacher", "--task", m.task, "--data", m.data,
                                            "--out", str(teacher), *FAST, *m.teacher_flags])  # fmt: skip
        step(f"{m.task} student", student, ["training.train", "distill", "--task", m.task, "--teacher",
                                            str(teacher), "--out", str(student), *DISTILL])  # fmt: skip
        step(f"{m.task} bundle", bundle, ["export.onnx_export", "--student", str(student), "--out", str(bundle),
                                          "--eval-size", "300"])  # fmt: skip
        bundles.append(bundle)
    # Each task's image tower has its own embedding space (model_id), so each gets its own store rows.
    for bundle in bundles:
        marker = root / "store" / f".demo-cached-{bundle.name}"
        if not marker.exists():
            subprocess.run([sys.executable, "-m", "export.cache_cli", "build", "--bundle", str(bundle), "--images",
                            str(easy_vqa_test_images()), "--store", str(root / "store")], check=True)  # fmt: skip
            marker.touch()
    log.info("demo artefacts ready under %s (%.0fs)", root, time.time() - t0)
    return bundles


CURL = """
The DiDE demo is serving on http://{host}:{port}  (OpenAPI docs: http://{host}:{port}/docs)
Try (easy-VQA test images are cached by file stem, e.g. "0"):

  curl -s http://{host}:{port}/vqa -H 'content-type: application/json' \\
       -d '{{"image_id": "0", "question": "what shape is in the image?"}}'

  curl -s http://{host}:{port}/vqa -H 'content-type: application/json' \\
       -d "{{\\"image\\": \\"$(base64 -w0 {image})\\", \\"question\\": \\"what color is the shape?\\"}}"

  curl -s http://{host}:{port}/entailment -H 'content-type: application/json' \\
       -d '{{"image_id": "1", "hypothesis": "there is a red circle"}}'

  curl -s http://{host}:{port}/reasoning -H 'content-type: application/json' \\
       -d '{{"images": [{{"image_id": "2"}}, {{"image_id": "3"}}], "statement": "both images contain a circle"}}'

  curl -s http://{host}:{port}/metrics | grep dide_request_duration_seconds_count
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dide-demo", description=__doc__.split("\n")[0])
    p.add_argument("command", nargs="?", choices=("serve", "build"), default="serve", help="serve (default) or build")
    p.add_argument("--root", default="artifacts/demo", help="where the demo artefacts are built and kept")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on")
    p.add_argument("--port", type=int, default=8000, help="port to serve on")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = Path(args.root).resolve()
    try:
        bundles = build(root)
    except subprocess.CalledProcessError as e:
        log.error("demo build step failed (exit %d): %s", e.returncode, " ".join(map(str, e.cmd)))
        return 1
    if args.command == "build":
        return 0
    os.environ["DIDE_BUNDLES"] = ",".join(str(b) for b in bundles)
    os.environ["DIDE_STORE"] = str(root / "store")
    print(CURL.format(host=args.host, port=args.port, image=easy_vqa_test_images() / "0.png"), flush=True)
    from service.app import main as serve

    return serve(["--host", args.host, "--port", str(args.port)])


if __name__ == "__main__":
    sys.exit(main())
