"""End-to-end accuracy through the HTTP API: easy-VQA test questions posted to a running service.

    python -m bench.service_accuracy --url http://127.0.0.1:8000 --student artifacts/demo/runs/vqa/student

Posts every test question once with the image as base64 bytes and once by id (the file stem, as the demo
caches them), scores the top answer, and compares with `dide-train eval` on the same student (the same
model in torch). Writes bench/results/service_accuracy.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx


async def score(url: str, examples: list, mode: str, concurrency: int) -> dict:
    sem = asyncio.Semaphore(concurrency)
    correct = errors = 0
    cache: dict[Path, str] = {}

    async def one(client: httpx.AsyncClient, ex) -> None:
        nonlocal correct, errors
        if mode == "bytes":
            if ex.image not in cache:
                cache[ex.image] = base64.b64encode(ex.image.read_bytes()).decode()
            body = {"image": cache[ex.image], "question": ex.question, "top_k": 1}
        else:
            body = {"image_id": ex.image.stem, "question": ex.question, "top_k": 1}
        async with sem:
            r = await client.post(f"{url}/vqa", json=body)
        if r.status_code != 200:
            errors += 1
            return
        correct += r.json()["answers"][0]["answer"] in ex.answers

    t0 = time.time()
    async with httpx.AsyncClient(timeout=60) as client:
        await asyncio.gather(*(one(client, ex) for ex in examples))
    n = len(examples)
    return {"mode": mode, "n": n, "accuracy": correct / n, "errors": errors, "seconds": time.time() - t0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the running service")
    p.add_argument("--student", required=True, help="the student directory the service's VQA bundle came from")
    p.add_argument("--limit", type=int, default=None, help="first N test questions only")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    p.add_argument("--out", default="bench/results/service_accuracy.json", help="where to write the result")
    args = p.parse_args(argv)
    from training.easy_vqa import load_easy_vqa

    examples = load_easy_vqa().test[: args.limit]
    cmd = [sys.executable, "-m", "training.train", "eval", "--model", args.student]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    reference = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    runs = [asyncio.run(score(args.url, examples, mode, args.concurrency)) for mode in ("bytes", "ids")]
    result = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "command": "python -m bench.service_accuracy " + " ".join(argv if argv is not None else sys.argv[1:]),
        "dide_train_eval": reference,
        "service": runs,
        "max_gap_points": max(abs(r["accuracy"] - reference["accuracy"]) * 100 for r in runs),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
