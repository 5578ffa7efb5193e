"""`dide-demo`: the shipped models' checks, the test split it serves, the from-scratch rebuild at a small scale, and
every printed curl example posted to a live demo server and compared with its ground truth; `bench.service_accuracy`
against that server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from bench import service_accuracy
from bench.server import REPO, LiveServer, free_port, stop_server, wait_ready
from core.bundle import BUNDLE_FILES, LABELS, MANIFEST, write_manifest
from service.demo import demo_images
from service.demo import main as demo
from service.demo_examples import PLAN, curl_command, request_body, response_answer
from service.shipped import MODELS_DIR, MODELS_JSON, TASKS, ShippedModelsError, read_models, write_models


def scenes_test(task: str, test: int, seed: int, train: int = 2) -> list[tuple]:
    """A scenes test split as (image names, image bytes, text, answer, grid) per example."""
    from training.demo_split import answer_of
    from training.examples import images_of, text_of
    from training.scenes import load_scenes

    data = load_scenes(task, train=train, test=test, seed=seed)
    return [
        (
            [p.name for p in images_of(e)],
            [p.read_bytes() for p in images_of(e)],
            text_of(e),
            answer_of(e),
            e.grid,
        )
        for e in data.test
    ]


def test_the_test_split_does_not_depend_on_the_train_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each split has its own seed (`scenes/{task}/{seed}/{split}`), so the demo can render the test split the
    models were evaluated on with a two-image train split."""
    monkeypatch.setenv("DIDE_DATA_DIR", str(tmp_path))
    for task in TASKS:
        tiny, trained = scenes_test(task, 6, 0), scenes_test(task, 6, 0, train=9)
        assert tiny and tiny == trained, task
        assert scenes_test(task, 6, 1) != tiny  # the seed does change it


# --- the shipped folder's checks, on fake bundles (only their hashes matter here) ------------------------


def fake_models(directory: Path, work: Path) -> Path:
    bundles = {}
    for task in TASKS:
        bundle = work / task
        bundle.mkdir(parents=True)
        for name in BUNDLE_FILES:
            (bundle / name).write_text(json.dumps(["False", "True"]) if name == LABELS else f"{task} {name}")
        write_manifest(bundle, {"task": task, "model_id": f"fake-{task}", "dim": 4, "precision": "fp32"})
        bundles[task] = bundle
    record = {"scale": "small", "tasks": {t: {"test_split": {"test": 4, "seed": 0}, "examples": []} for t in TASKS}}
    write_models(directory, bundles, record, after=read_models)
    return directory


def test_shipped_models_are_checked_against_models_json(tmp_path: Path) -> None:
    models = fake_models(tmp_path / "models", tmp_path / "work")
    recorded = read_models(models)
    assert set(recorded["tasks"]) == set(TASKS)
    assert recorded["tasks"]["vqa"]["model_id"] == "fake-vqa"
    assert sorted(p.name for p in models.iterdir()) == sorted([*TASKS, MODELS_JSON])


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda m: (m / "vqa" / MANIFEST).write_text((m / "vqa" / MANIFEST).read_text() + " "), "vqa model"),
        (lambda m: (m / "reasoning" / LABELS).write_text('["True", "False"]'), "does not match the manifest"),
        (lambda m: (m / "entailment" / BUNDLE_FILES[0]).unlink(), "cannot read it"),
        (lambda m: (m / MODELS_JSON).unlink(), "no demo models"),
        (lambda m: shutil.rmtree(m / "entailment"), "cannot be read"),
    ],
    ids=["manifest", "file", "missing-file", "no-models-json", "no-bundle"],
)
def test_a_tampered_shipped_model_is_refused(tmp_path: Path, tamper, message: str, caplog) -> None:
    models = fake_models(tmp_path / "models", tmp_path / "work")
    tamper(models)
    with pytest.raises(ShippedModelsError, match=message) as e:
        read_models(models)
    assert "git checkout" in str(e.value) and "dide-demo rebuild" in str(e.value)
    # dide-demo refuses before doing anything else, with the same message
    assert demo(["build", "--models", str(models), "--root", str(tmp_path / "root")]) == 1
    assert str(e.value) in caplog.text
    assert not (tmp_path / "root").exists()


# --- the rebuild at a small scale, and the demo served from it (or from the shipped models) ----------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def small_models(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """`dide-demo rebuild --scale small`: every step from scratch, on a few scenes, three tasks at once."""
    out = tmp_path_factory.mktemp("rebuild")
    argv = ["rebuild", "--scale", "small", "--models", str(out / "models"), "--work", str(out / "work"), "--jobs", "3"]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DIDE_DATA_DIR", str(data_dir))  # the training subprocesses inherit it
        assert demo(argv) == 0
    return out / "models"


def served_models(small_models: Path) -> Path:
    """The shipped models when there are any, else the small rebuild's."""
    return MODELS_DIR if (MODELS_DIR / MODELS_JSON).is_file() else small_models


def check_against_ground_truth(models: dict) -> None:
    """Every example's expected answer is its test example's answer, of the kind the plan asks for."""
    from training.demo_split import answer_of
    from training.examples import images_of, text_of
    from training.scenes import load_scenes

    for task, entry in models["tasks"].items():
        data = load_scenes(task, train=2, test=entry["test_split"]["test"], seed=entry["test_split"]["seed"])
        truth = {(tuple(f"{task}-{p.stem}" for p in images_of(e)), text_of(e)): answer_of(e) for e in data.test}
        assert [e["kind"] for e in entry["examples"]] == [kind for kind, _ in PLAN[task]]
        for example in entry["examples"]:
            body = example["body"]
            ids = [i["image_id"] for i in body["images"]] if task == "reasoning" else [body.get("image_id")]
            ids = [example["upload"]] if "upload" in example else ids
            text = body.get("question") or body.get("hypothesis") or body["statement"]
            expected = str(example["expected"]) if task == "reasoning" else example["expected"]
            assert truth[(tuple(ids), text)] == expected, example


@pytest.mark.slow
def test_the_small_rebuild_writes_checked_models(small_models: Path, data_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("DIDE_DATA_DIR", str(data_dir))
    models = read_models(small_models)
    assert models["scale"] == "small" and models["command"] == "dide-demo rebuild --scale small"
    for task, entry in models["tasks"].items():
        assert entry["data"] == "scenes:train=6,test=4,seed=0"
        assert entry["teacher"]["command"].startswith(f"dide-train teacher --task {task} --data scenes:")
        assert entry["student"]["command"].startswith(f"dide-train distill --task {task} ")
        for who in ("teacher", "student"):
            assert 0.0 <= entry[who]["test_accuracy"] <= 1.0
        labels = json.loads((small_models / task / LABELS).read_text())
        for example in entry["examples"]:
            assert (str(example["expected"]) if task == "reasoning" else example["expected"]) in labels
    check_against_ground_truth(models)


@pytest.mark.slow
def test_every_printed_example_answers_over_http(small_models: Path, data_dir: Path, tmp_path: Path, monkeypatch):
    """The real demo process: it prints its curl examples and serves them; each, run as printed, gets a
    well-formed answer, and the right one (its test split's) from the shipped full-scale models."""
    monkeypatch.setenv("DIDE_DATA_DIR", str(data_dir))
    models_dir = served_models(small_models)
    models = read_models(models_dir)
    check_against_ground_truth(models)
    root, port = tmp_path / "demo", free_port()
    command = [sys.executable, "-m", "service.demo", "--models", str(models_dir), "--root", str(root)]
    log = tmp_path / "demo.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [*command, "--port", str(port)],
            cwd=REPO,
            env={**os.environ, "DIDE_DATA_DIR": str(data_dir), "DIDE_THREADS": "2"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = LiveServer(f"http://127.0.0.1:{port}", process, log)
    try:
        wait_ready(server, timeout=300)
        printed = server.log_text()
        images = demo_images(root)
        examples = [e for entry in models["tasks"].values() for e in entry["examples"]]
        assert {e["task"] for e in examples} == set(TASKS) and any("upload" in e for e in examples)
        for example in examples:
            command_text = curl_command(example, server.url, images)
            assert command_text in printed
            by_curl = json.loads(subprocess.run(["bash", "-c", command_text], capture_output=True, check=True).stdout)
            r = httpx.post(server.url + example["endpoint"], json=request_body(example, images), timeout=30)
            assert r.status_code == 200, r.text
            answer = response_answer(example["endpoint"], r.json())
            assert response_answer(example["endpoint"], by_curl) == answer
            assert type(answer) is type(example["expected"])
            if models["scale"] == "full":
                assert answer == example["expected"], (example, r.json())
        assert "dide_request_duration_seconds_count" in httpx.get(server.url + "/metrics").text
        assert "libtorch" not in Path(f"/proc/{process.pid}/maps").read_text()  # serving never loads torch
        assert f"{server.url}/docs" in printed and httpx.get(server.url + "/docs").status_code == 200

        # The test splits through the API, by id and as bytes, answer as the bundles do offline.
        out = tmp_path / "results"
        argv = ["--url", server.url, "--root", str(root), "--models", str(models_dir), "--limit", "24", "--out"]
        assert service_accuracy.main([*argv, str(out)]) == 0
        report = json.loads((out / "service_accuracy.json").read_text())
        assert set(report["tasks"]) == set(TASKS) and (out / "service_accuracy.md").read_text().count("\n| ") == 4
        for task, row in report["tasks"].items():
            assert row["examples"] == 24, task
            for mode in service_accuracy.MODES:
                assert row[mode]["errors"] == 0, row[mode]["first_error"]
                assert row[mode]["agrees_with_offline"] == 1.0 and row[mode]["accuracy"] == row["bundle_offline"]
    finally:
        stop_server(server)


@pytest.mark.parametrize(
    ("with_splits", "extra", "message"),
    [
        (True, [], "no service at http://127.0.0.1:"),
        (False, [], "examples.jsonl missing: --root must be the running demo's root"),
        (True, ["--limit", "0"], "--limit and --concurrency must be >= 1"),
    ],
)
def test_service_accuracy_says_what_is_wrong(tmp_path: Path, capsys, with_splits: bool, extra: list, message: str):
    root, out = tmp_path / "root", tmp_path / "out"
    for task in TASKS if with_splits else ():
        (root / "split" / task).mkdir(parents=True)
        (root / "split" / task / "examples.jsonl").write_text("")
    argv = ["--url", f"http://127.0.0.1:{free_port()}", "--root", str(root), "--out", str(out), *extra]
    with pytest.raises(SystemExit) as e:
        service_accuracy.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()
