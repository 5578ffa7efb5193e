"""The demo's curl examples: drawn from each task's test split when the demo models are rebuilt, kept in
models.json as data (endpoint, body, expected answer), and printed from that data as ready-to-paste commands.

An example is a dict: `task`, `endpoint`, `kind` (relational, counting or attribute), `body` (the JSON sent),
`expected` (the test split's answer, as the response carries it: the first VQA answer, the entailment label,
the reasoning verdict as a bool), `answered_right` (whether the shipped student got it right when it was
chosen) and, for an upload, `upload`: the id of the image whose bytes are sent base64 as `image`.
"""

from __future__ import annotations

import base64
import json
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.runtime import Bundle
from service.answers import entailment_scores, reasoning_verdict, top_answers

ENDPOINTS = {"vqa": "/vqa", "entailment": "/entailment", "reasoning": "/reasoning"}
TEXT_FIELDS = {"vqa": "question", "entailment": "hypothesis", "reasoning": "statement"}
KINDS = (
    ("relational", re.compile(r"\b(left of|right of|above|below)\b")),
    ("counting", re.compile(r"\b(how many|at least|at most|more|fewer|same number)\b")),
)
# What each task's examples show, and how the image is sent: by its cached id, or its bytes as base64.
PLAN = {
    "vqa": (("relational", "id"), ("counting", "id"), ("attribute", "upload")),
    "entailment": (("relational", "id"), ("counting", "id")),
    "reasoning": (("relational", "id"), ("counting", "id")),
}
BATCH = 256


@dataclass(frozen=True)
class SplitExample:
    """One test example as `training.demo_split` writes it: image ids, text, and the answer label."""

    images: list[str]
    text: str
    answer: str


def read_split(examples_jsonl: Path) -> list[SplitExample]:
    with open(examples_jsonl) as f:
        return [SplitExample(**json.loads(line)) for line in f if line.strip()]


def kind_of(text: str) -> str:
    return next((kind for kind, pattern in KINDS if pattern.search(text)), "attribute")


def expected_value(task: str, answer: str) -> str | bool:
    """A split's answer label as the endpoint returns it (reasoning: a bool)."""
    return answer == "True" if task == "reasoning" else answer


def response_answer(endpoint: str, response: dict) -> str | bool:
    """What an example's `expected` is compared with: the first VQA answer, else the label."""
    return response["answers"][0]["answer"] if endpoint == ENDPOINTS["vqa"] else response["label"]


def predict(
    bundle: Bundle, examples: list[SplitExample], image_file: Callable[[str], Path]
) -> list[tuple[str | bool, float]]:
    """The bundle's answer to every example and its probability, as the service would compute them."""
    ids = sorted({i for e in examples for i in e.images})
    row = {image_id: k for k, image_id in enumerate(ids)}
    images = np.concatenate(
        [
            bundle.encode_images(bundle.preprocess_images([image_file(i).read_bytes() for i in ids[s : s + BATCH]]))
            for s in range(0, len(ids), BATCH)
        ]
    )  # (I, D)
    texts = sorted({e.text for e in examples})
    text_row = {t: k for k, t in enumerate(texts)}
    text_emb = np.concatenate([bundle.encode_texts(texts[s : s + BATCH]) for s in range(0, len(texts), BATCH)])
    out: list[tuple[str | bool, float]] = []
    for s in range(0, len(examples), BATCH):
        chunk = examples[s : s + BATCH]
        t = text_emb[[text_row[e.text] for e in chunk]]
        first = images[[row[e.images[0]] for e in chunk]]
        second = images[[row[e.images[1]] for e in chunk]] if bundle.task == "reasoning" else None
        for logits in bundle.head(t, first, second):
            if bundle.task == "vqa":
                out.append(top_answers(logits, bundle.labels, 1)[0])
            elif bundle.task == "entailment":
                label, scores = entailment_scores(logits, bundle.labels)
                out.append((label, scores[label]))
            else:
                verdict, p_true = reasoning_verdict(logits, bundle.labels)
                out.append((verdict, p_true if verdict else 1.0 - p_true))
    return out


def choose_examples(task: str, examples: list[SplitExample], predictions: list[tuple[str | bool, float]]) -> list[dict]:
    """PLAN's examples for `task`: of each kind, one the model answers right (a label not shown yet first, then
    the most confident), or the kind's first example when it answers none right."""
    chosen: list[dict] = []
    taken: set[int] = set()
    for kind, how in PLAN[task]:
        candidates = [k for k, e in enumerate(examples) if k not in taken and kind_of(e.text) == kind]
        candidates = candidates or [k for k in range(len(examples)) if k not in taken]
        shown = {c["expected"] for c in chosen}

        def expected(k: int) -> str | bool:
            return expected_value(task, examples[k].answer)

        right = [k for k in candidates if predictions[k][0] == expected(k)]
        k = max(right, key=lambda k: (expected(k) not in shown, predictions[k][1], -k)) if right else candidates[0]
        taken.add(k)
        e = examples[k]
        example: dict = {"task": task, "endpoint": ENDPOINTS[task], "kind": kind_of(e.text)}
        if how == "upload" and task != "reasoning":
            example["upload"] = e.images[0]
            example["body"] = {TEXT_FIELDS[task]: e.text}
        else:
            example["body"] = split_body(task, e)
        example["expected"] = expected(k)
        example["answered_right"] = bool(right)
        chosen.append(example)
    return chosen


def split_body(task: str, example: SplitExample, image: Callable[[str], dict] | None = None) -> dict:
    """The endpoint's JSON for a test example, each image as `image(id)`: by default its cached id."""
    images = [image(i) if image else {"image_id": i} for i in example.images]
    head = {"images": images} if task == "reasoning" else images[0]
    return {**head, TEXT_FIELDS[task]: example.text}


def request_body(example: dict, image_file: Callable[[str], Path]) -> dict:
    """The JSON an example posts, an upload's image read and base64-encoded."""
    if "upload" not in example:
        return example["body"]
    return {"image": base64.b64encode(image_file(example["upload"]).read_bytes()).decode(), **example["body"]}


def curl_command(example: dict, url: str, image_file: Callable[[str], Path]) -> str:
    """The printed command for an example, its expected answer in a trailing comment."""
    head = f"curl -s {url}{example['endpoint']} -H 'content-type: application/json' \\\n       -d "
    if "upload" in example:
        # In double quotes, so that the shell substitutes the file's base64; the JSON's own quotes escaped.
        marker = "@IMAGE@"
        body = json.dumps({"image": marker, **example["body"]}).replace("\\", "\\\\").replace('"', '\\"')
        body = body.replace("$", "\\$").replace("`", "\\`")
        data = '"' + body.replace(marker, f"$(base64 -w0 {shlex.quote(str(image_file(example['upload'])))})") + '"'
    else:
        data = shlex.quote(json.dumps(example["body"]))
    expected = json.dumps(example["expected"]) if isinstance(example["expected"], bool) else example["expected"]
    how = example["kind"] + (", the image sent as base64 bytes" if "upload" in example else "")
    return f"{head}{data}   # expected: {expected} ({how})"


def demo_text(models: dict, url: str, image_file: Callable[[str], Path]) -> str:
    """What `dide-demo` prints once its models are ready: the docs, each task's ids and examples, /metrics."""
    lines = [
        f"The DiDE demo is serving on {url}  (OpenAPI docs: {url}/docs)",
        "Its students were distilled on synthetic scenes; each task's test images are cached by id, and each",
        "example below is a test-split example with its true answer beside it (/vqa: the first ranked answer):",
        "",
    ]
    for task, entry in models["tasks"].items():
        n = entry["test_split"]["test"]
        lines.append(
            f"# {ENDPOINTS[task]}: images {task}-00000 … {task}-{n - 1:05d}; "
            f"the student scores {entry['student']['test_accuracy']:.3f} on its test split"
        )
        lines += [curl_command(e, url, image_file) + "\n" for e in entry["examples"]]
    lines.append(f"curl -s {url}/metrics | grep dide_request_duration_seconds_count")
    return "\n".join(lines)
