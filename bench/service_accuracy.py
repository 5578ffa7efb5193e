"""End-to-end accuracy through the HTTP API: the demo's test splits posted to a running `dide-demo`.

    dide-demo &                         # serves the shipped models, their test images cached by id
    python -m bench.service_accuracy    # --url http://127.0.0.1:8000 --root artifacts/demo

Posts every test example of every task the demo serves twice: its images once by the ids the demo cached
them under, once as base64 bytes (found in the store by their sha256, so the image tower does not run
again). Each answer is scored against the split's, and compared with the same bundle's answer computed
offline (its ONNX sessions without HTTP, as `dide-demo rebuild` chose the examples) and with the student's
`dide-train eval` accuracy recorded in models.json. Writes bench/results/service_accuracy.{json,md,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from bench.measure import header, save_figure, write_results
from export.runtime import Bundle, default_providers
from service.demo import demo_images
from service.demo_examples import (
    ENDPOINTS,
    SplitExample,
    expected_value,
    predict,
    read_split,
    response_answer,
    split_body,
)
from service.shipped import MODELS_DIR, ShippedModelsError, read_models

MODES = ("ids", "bytes")


def request_body(task: str, example: SplitExample, mode: str, encoded: Callable[[str], str]) -> dict:
    """The endpoint's JSON for one test example, its images by id or as base64 bytes."""
    body = split_body(task, example, (lambda i: {"image": encoded(i)}) if mode == "bytes" else None)
    return {**body, "top_k": 1} if task == "vqa" else body


async def ask_all(url: str, task: str, examples: list[SplitExample], mode: str, image_file, concurrency: int):
    """Every example through the API: (answers, None where the request failed; first error; seconds)."""
    sem = asyncio.Semaphore(concurrency)
    cache: dict[str, str] = {}
    errors: list[str] = []

    def encoded(image_id: str) -> str:
        if image_id not in cache:
            cache[image_id] = base64.b64encode(image_file(image_id).read_bytes()).decode()
        return cache[image_id]

    async def one(client: httpx.AsyncClient, example: SplitExample):
        body = request_body(task, example, mode, encoded)
        async with sem:
            r = await client.post(f"{url}{ENDPOINTS[task]}", json=body)
        if r.status_code != 200:
            errors.append(f"{r.status_code}: {r.text[:300]}")
            return None
        return response_answer(ENDPOINTS[task], r.json())

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=60) as client:
        answers = await asyncio.gather(*(one(client, e) for e in examples))
    return answers, errors[0] if errors else None, time.perf_counter() - t0


def split_file(root: Path, task: str) -> Path:
    return root / "split" / task / "examples.jsonl"


def score_task(task: str, entry: dict, root: Path, url: str, limit: int | None, concurrency: int) -> dict:
    examples = read_split(split_file(root, task))[:limit]
    truth = [expected_value(task, e.answer) for e in examples]
    image_file = demo_images(root)
    offline = [answer for answer, _ in predict(Bundle.load(root / "bundles" / task), examples, image_file)]
    row = {
        "examples": len(examples),
        "dide_train_eval": entry["student"]["test_accuracy"] if limit is None else None,
        "bundle_offline": accuracy(offline, truth),
    }
    for mode in MODES:
        answers, error, seconds = asyncio.run(ask_all(url, task, examples, mode, image_file, concurrency))
        row[mode] = {
            "accuracy": accuracy(answers, truth),
            "agrees_with_offline": sum(a == b for a, b in zip(answers, offline, strict=True)) / len(examples),
            "errors": sum(a is None for a in answers),
            "first_error": error,
            "seconds": round(seconds, 2),
            "requests_per_s": round(len(examples) / seconds, 1),
        }
    return row


def accuracy(answers: list, truth: list) -> float:
    return sum(a == t for a, t in zip(answers, truth, strict=True)) / len(truth)


def markdown(report: dict) -> str:
    lines = [
        f"End-to-end accuracy of the demo through its HTTP API, {report['date'][:10]}: every test example "
        f"{'(the first ' + str(report['limit']) + ' per task) ' if report['limit'] else ''}posted by image id and "
        f"as base64 bytes, {report['concurrency']} in flight; `{report['command']}`.",
        "",
        "| task | examples | `dide-train eval` (torch) | bundle offline (ONNX) | API, by id | API, as bytes "
        "| API = offline | errors | req/s (id / bytes) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for task, r in report["tasks"].items():
        torch_acc = "–" if r["dide_train_eval"] is None else f"{r['dide_train_eval']:.4f}"
        agree = min(r[m]["agrees_with_offline"] for m in MODES)
        lines.append(
            f"| {task} | {r['examples']} | {torch_acc} | {r['bundle_offline']:.4f} | {r['ids']['accuracy']:.4f} | "
            f"{r['bytes']['accuracy']:.4f} | {agree:.1%} | {r['ids']['errors'] + r['bytes']['errors']} | "
            f"{r['ids']['requests_per_s']} / {r['bytes']['requests_per_s']} |"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(report["tasks"])
    series = {
        "dide-train eval": [report["tasks"][t]["dide_train_eval"] or 0.0 for t in tasks],
        "bundle offline": [report["tasks"][t]["bundle_offline"] for t in tasks],
        "API by id": [report["tasks"][t]["ids"]["accuracy"] for t in tasks],
        "API as bytes": [report["tasks"][t]["bytes"]["accuracy"] for t in tasks],
    }
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(series)
    for k, (name, values) in enumerate(series.items()):
        ax.bar([i + k * width for i in range(len(tasks))], values, width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], tasks)
    ax.set_ylim(0, 1.15)
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_ylabel("test accuracy")
    ax.set_title("The demo's students: offline and through the API")
    ax.legend(loc="upper center", ncol=len(series), fontsize=8, frameon=False)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m bench.service_accuracy", description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the running dide-demo")
    p.add_argument("--root", default="artifacts/demo", help="the demo's --root: its bundles and test images")
    p.add_argument("--models", default=str(MODELS_DIR), help="the demo's --models: models.json and its accuracies")
    p.add_argument("--limit", type=int, default=None, help="the first N test examples of each task only")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    p.add_argument("--out", default="bench/results", help="where service_accuracy.{json,md,png} go")
    args = p.parse_args(argv)
    if (args.limit is not None and args.limit < 1) or args.concurrency < 1:
        p.error("--limit and --concurrency must be >= 1")
    try:
        models = read_models(Path(args.models))
    except ShippedModelsError as e:
        p.error(str(e))
    root = Path(args.root)
    missing = [str(f) for f in (split_file(root, task) for task in models["tasks"]) if not f.is_file()]
    if missing:
        p.error(f"{', '.join(missing)} missing: --root must be the running demo's root (dide-demo --root)")
    try:
        ready = httpx.get(f"{args.url}/readyz", timeout=10)
    except httpx.HTTPError as e:
        p.error(f"no service at {args.url} ({type(e).__name__}): start the demo first (`make demo` or `dide-demo`)")
    if ready.status_code != 200:
        p.error(f"{args.url}/readyz answered {ready.status_code}: the service is not ready")
    report = {
        **header("service_accuracy", argv, quick=False, threads=None, provider=default_providers()[0]),
        "url": args.url,
        "limit": args.limit,
        "concurrency": args.concurrency,
        "tasks": {},
    }
    for task, entry in models["tasks"].items():
        report["tasks"][task] = score_task(task, entry, root, args.url, args.limit, args.concurrency)
    write_results(Path(args.out), "service_accuracy", report, markdown, plot)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
