"""bench.accuracy end to end at tiny size: the ablation and the two-stage rows are trained, evaluated and reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import accuracy
from bench.measure import markers


@pytest.mark.slow
def test_two_stage_ablation_writes_json_markdown_and_readme(tmp_path, monkeypatch):
    """With the scenes teachers' recipe: the ITM and task teachers get --teacher-flags (the grid rung on the
    pairs too), stage 1 --pretrain-flags."""
    monkeypatch.setenv("DIDE_DATA_DIR", str(tmp_path / "data"))
    readme = tmp_path / "README.md"
    start, end = markers("two-stage")
    readme.write_text(f"intro\n{start}\nold\n{end}\nrest\n")
    out = tmp_path / "results"
    teacher_flags, pretrain_flags = "--lr 1e-3 --dropout 0 --augment none --grid-loss 1", "--augment none --grid-loss 1"
    argv = ["--datasets", "scenes-vqa", "--variants", "dide", "dide-2stage", "--size", "tiny",
            "--scenes", "scenes:train=12,test=8,seed=0", "--teacher-epochs", "1", "--student-epochs", "1",
            "--itm-epochs", "1", "--pretrain-epochs", "1", "--batch-size", "8", "--two-stage",
            "--teacher-flags", teacher_flags, "--pretrain-flags", pretrain_flags,
            "--work", str(tmp_path / "work"), "--out", str(out),
            "--readme", str(readme), "--name", "two-stage"]  # fmt: skip
    assert accuracy.main(argv) == 0

    report = json.loads((out / "two-stage.json").read_text())
    assert (report["teacher_flags"], report["pretrain_flags"]) == (teacher_flags, pretrain_flags)
    rows = report["datasets"]["scenes-vqa"]
    assert set(rows["runs"]) == {"teacher", "dide", "dide-2stage"}
    assert set(rows["stage1"]) == {"itm-teacher", "stage1"}
    assert rows["stage1"]["itm-teacher"][0]["task"] == "itm"
    assert teacher_flags in rows["stage1"]["itm-teacher"][0]["command"]
    assert pretrain_flags in rows["stage1"]["stage1"][0]["command"]
    two_stage = rows["runs"]["dide-2stage"][0]
    assert "--init" in two_stage["command"] and "stage1" in two_stage["command"]
    teacher = rows["runs"]["teacher"][0]["command"]
    assert "--init" in teacher and teacher_flags in teacher  # the task teacher starts from the ITM teacher
    for runs in rows["runs"].values():
        assert 0.0 <= runs[0]["accuracy"] <= 1.0 and runs[0]["n"] > 0
    (stage1,) = (tmp_path / "work").glob("itm-scenes-*/seed0")
    assert json.loads((stage1 / "itm-teacher" / "dide.json").read_text())["training"]["grid_loss"] == 1.0
    assert json.loads((stage1 / "stage1" / "config.json").read_text())["loss_weights"]["grid"] == 1.0
    table = (out / "two-stage.md").read_text()
    assert "DiDE, both stages" in table and "stage-1 student" in table
    assert f"teacher 1 epochs (`{teacher_flags}`)" in table and f"(trained with `{pretrain_flags}`)" in table
    assert table in readme.read_text() and "old" not in readme.read_text()


def test_bad_flags_are_refused_with_a_message(tmp_path, capsys):
    for argv, message in (
        (["--variants", "dide-2stage"], "the dide-2stage variant needs --two-stage"),
        (["--datasets", "easy-vqa", "--teacher", str(tmp_path / "nowhere")], "not a directory"),
        (["--datasets", "easy-vqa", "scenes-vqa", "--teacher", str(tmp_path)], "--teacher takes one dataset"),
        (["--merge", str(tmp_path / "missing.json")], "cannot read a report"),
        (["--patience", "-1"], "--patience must be >= 0 and --eval-limit >= 1"),
        (["--first-seed", "-1"], "--seeds must be >= 1 and --first-seed >= 0"),
        (["--datasets", "easy-vqa", "--teacher", str(tmp_path), "--two-stage"], "--teacher takes one dataset and no"),
        (["--datasets", "easy-vqa", "--teacher", str(tmp_path), "--teacher-flags", "--lr 1"], "is not trained"),
        (["--pretrain-flags", "--dropout 0"], "--pretrain-flags needs --two-stage"),
        (["--teacher-flags", "--epochs 9"], "--teacher-flags: --epochs is set by the benchmark itself"),
        (["--student-flags", "--dropout 0 --se 1"], "--student-flags: --se is set by the benchmark itself"),
        (
            ["--teacher-flags", "--lr 1 --no-such 1"],
            "--teacher-flags: dide-train: error: unrecognized arguments: --no-such 1",
        ),
        (["--pretrain-flags", "--lr x", "--two-stage"], "--pretrain-flags: dide-train pretrain: error: argument --lr"),
        (["--two-stage", "--student-flags", "--fusion product"], "dide-2stage starts from the stage-1 student"),
        (["--two-stage", "--teacher-flags", "--grid-loss 1"], "easy-vqa's image-caption pairs have no grid labels"),
    ):
        with pytest.raises(SystemExit) as e:
            accuracy.main([*argv, "--work", str(tmp_path)])
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def given_teacher(tmp_path: Path, monkeypatch, data: str) -> Path:
    """A tiny scenes-VQA teacher trained for one epoch: the --teacher the benchmark is given."""
    from training.train import main as dide_train

    monkeypatch.setenv("DIDE_DATA_DIR", str(tmp_path / "data"))
    teacher = tmp_path / "given-teacher"
    assert dide_train(["teacher", "--task", "vqa", "--data", data, "--size", "tiny", "--epochs", "1",
                       "--batch-size", "8", "--out", str(teacher)]) == 0  # fmt: skip
    return teacher


@pytest.mark.slow
def test_a_given_teacher_is_used_not_trained_and_seeds_vary_the_students(tmp_path, monkeypatch):
    data = "scenes:train=4,test=32,seed=0"
    tiny_teacher_dir = given_teacher(tmp_path, monkeypatch, data)
    out = tmp_path / "results"
    argv = ["--datasets", "scenes-vqa", "--variants", "pred-kd", "--size", "tiny", "--teacher", str(tiny_teacher_dir),
            "--scenes", data, "--student-epochs", "1", "--batch-size", "8", "--seeds", "2",
            "--work", str(tmp_path / "work"), "--out", str(out)]  # fmt: skip
    assert accuracy.main(argv) == 0
    report = json.loads((out / "accuracy.json").read_text())
    assert report["teacher"] == str(tiny_teacher_dir)
    assert not (tmp_path / "work" / "scenes-vqa" / "seed0" / "teacher").exists()
    runs = report["datasets"]["scenes-vqa"]["runs"]
    assert str(tiny_teacher_dir) in runs["pred-kd"][0]["command"] and runs["teacher"][0]["n"] > 0
    assert len(runs["teacher"]) == 1 and [r["seed"] for r in runs["pred-kd"]] == [0, 1]  # one teacher, 2 students
    assert report["datasets"]["scenes-vqa"]["summary"]["pred-kd"]["n_seeds"] == 2
    assert f"teacher `{tiny_teacher_dir}`" in (out / "accuracy.md").read_text()
    # Each evaluation is kept beside its model: --collect gathers the same report without training or evaluating.
    assert (tmp_path / "work" / "scenes-vqa" / "seed1" / "pred-kd.eval.json").is_file()
    (tmp_path / "work" / "scenes-vqa" / "seed1" / "pred-kd" / "model.safetensors").unlink()  # eval would fail now
    assert accuracy.main([*argv, "--collect", "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "accuracy.json").read_text())
    assert again["datasets"]["scenes-vqa"]["runs"] == runs
    # A seed added later (--first-seed) reports the given teacher once, with that seed's student only.
    later = [*argv[:-4], "--seeds", "1", "--first-seed", "2", "--work", str(tmp_path / "work"), "--out", str(out)]
    assert accuracy.main([*later, "--name", "seed2"]) == 0
    added = json.loads((out / "seed2.json").read_text())["datasets"]["scenes-vqa"]["runs"]
    assert [r["seed"] for r in added["pred-kd"]] == [2] and [t["accuracy"] for t in added["teacher"]] == [
        runs["teacher"][0]["accuracy"]
    ]


@pytest.mark.slow
def test_a_run_killed_midway_is_resumed_not_taken_as_finished(tmp_path, monkeypatch):
    """Evaluated after every epoch, a student writes OUT before it ends: killed then, it leaves OUT and OUT.resume.
    The benchmark must resume it, not evaluate the half-trained model as if it were done."""
    from training.train import main as dide_train

    data = "scenes:train=4,test=8,seed=0"
    teacher = given_teacher(tmp_path, monkeypatch, data)
    out = tmp_path / "student"
    argv = ["distill", "--task", "vqa", "--teacher", str(teacher), "--out", str(out), "--epochs", "2",
            "--batch-size", "4", "--eval-every", "1", "--threads", "1"]  # fmt: skip

    def killed(model_dir, limit):  # the kill arrives during epoch 1's evaluation, after OUT is written
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr("training.loop.evaluate_dir", killed)
        with pytest.raises(KeyboardInterrupt):
            dide_train(argv)
    assert out.is_dir() and out.with_name("student.resume").is_dir()
    assert not accuracy.finished(out)
    seconds = accuracy.train(argv, out)
    assert accuracy.finished(out) and seconds > 0 and accuracy.evaluate(out)["n"] > 0


@pytest.mark.slow
def test_students_with_extra_flags_train_until_accuracy_stops_improving(tmp_path, monkeypatch):
    data = "scenes:train=4,test=16,seed=0"
    teacher = given_teacher(tmp_path, monkeypatch, data)
    out = tmp_path / "results"
    argv = ["--datasets", "scenes-vqa", "--variants", "dide", "--size", "tiny", "--teacher", str(teacher),
            "--scenes", data, "--student-epochs", "3", "--batch-size", "8", "--patience", "1", "--eval-limit", "16",
            "--student-flags", "--fusion product --dropout 0",
            "--work", str(tmp_path / "work"), "--out", str(out)]  # fmt: skip
    assert accuracy.main(argv) == 0
    report = json.loads((out / "accuracy.json").read_text())
    (run,) = report["datasets"]["scenes-vqa"]["runs"]["dide"]
    assert "--fusion product --dropout 0" in run["command"] and "--patience 1" in run["command"]
    assert 1 <= run["stopping"]["epoch"] <= run["stopping"]["epochs_run"] <= 3
    text = (out / "accuracy.md").read_text()
    assert "did not improve for 1 epoch(s) in a row (at most 3 epochs" in text
    assert "counting only once the best had left chance (2 points above" in text and 0 < run["stopping"]["majority"] < 1
    assert f"scenes-vqa, DiDE (pred + attn KD): {run['stopping']['epoch']}" in text


def report(dataset: str, accuracy_: float, **settings) -> dict:
    run = {"seed": 0, "accuracy": accuracy_, "n": 10, "command": f"dide-train ... {dataset}"}
    return {
        "date": "2026-12-01", "command": f"python -m bench.accuracy --datasets {dataset}",
        "machine": {"cpu": "cpu", "cores": 2}, "size": "mini", "teacher_epochs": 6, "student_epochs": 3,
        "seeds": 1, "max_train": 8000, "two_stage": False, "teacher": None, "variants": ["dide"],
        "datasets": {dataset: {"task": "vqa", "data": dataset, "runs": {"teacher": [run], "dide": [run]},
                               "summary": {"teacher": {"mean": accuracy_, "min": accuracy_, "max": accuracy_,
                                                       "n_seeds": 1}}}},
        "wall_seconds": 5.0,
    } | settings  # fmt: skip


def test_merge_joins_reports_of_the_same_settings(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(report("easy-vqa", 0.5)))
    b.write_text(json.dumps(report("scenes-vqa", 0.25, variants=["pred-kd", "dide"])))
    assert accuracy.main(["--merge", str(a), str(b), "--out", str(tmp_path), "--name", "merged"]) == 0
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert list(merged["datasets"]) == ["easy-vqa", "scenes-vqa"] and merged["variants"] == ["pred-kd", "dide"]
    assert merged["wall_seconds"] == 10.0 and "--datasets easy-vqa ; " in merged["command"]
    table = (tmp_path / "merged.md").read_text()
    assert "| easy-vqa | vqa | 0.500 |" in table and "| scenes-vqa | vqa | 0.250 |" in table

    b.write_text(json.dumps(report("scenes-vqa", 0.25, size="small")))
    with pytest.raises(SystemExit, match="settings differ: size"):
        accuracy.main(["--merge", str(a), str(b), "--out", str(tmp_path)])
    # A report from before --teacher-flags and --pretrain-flags had none: it joins one that gave none, not another.
    b.write_text(json.dumps(report("scenes-vqa", 0.25, teacher_flags="", pretrain_flags="")))
    assert accuracy.main(["--merge", str(a), str(b), "--out", str(tmp_path), "--name", "merged"]) == 0
    b.write_text(json.dumps(report("scenes-vqa", 0.25, teacher_flags="--grid-loss 1", pretrain_flags="")))
    with pytest.raises(SystemExit, match="settings differ: teacher_flags"):
        accuracy.main(["--merge", str(a), str(b), "--out", str(tmp_path)])
    a.write_text(json.dumps(report("easy-vqa", 0.5, two_stage=True, itm_epochs=3, pretrain_epochs=2)))
    b.write_text(json.dumps(report("scenes-vqa", 0.25, two_stage=True, itm_epochs=4, pretrain_epochs=2)))
    with pytest.raises(SystemExit, match="settings differ: itm_epochs"):
        accuracy.main(["--merge", str(a), str(b), "--out", str(tmp_path)])


def test_merge_adds_seeds_trained_later_and_refuses_a_seed_twice_or_another_teacher(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    first = report("scenes-vqa", 0.5, teacher="T", seeds=2)
    first["datasets"]["scenes-vqa"]["runs"]["dide"].append(
        {**first["datasets"]["scenes-vqa"]["runs"]["dide"][0], "seed": 1, "accuracy": 0.7}
    )
    later = report("scenes-vqa", 0.5, teacher="T", seeds=1, first_seed=2, date="2026-12-03")  # on another day
    later["datasets"]["scenes-vqa"]["runs"]["dide"] = [{"seed": 2, "accuracy": 0.9, "n": 10, "command": "c"}]
    a.write_text(json.dumps(first))
    b.write_text(json.dumps(later))
    assert accuracy.main(["--merge", str(a), str(b), "--out", str(tmp_path), "--name", "merged"]) == 0
    merged = json.loads((tmp_path / "merged.json").read_text())
    rows = merged["datasets"]["scenes-vqa"]
    assert [r["seed"] for r in rows["runs"]["dide"]] == [0, 1, 2] and len(rows["runs"]["teacher"]) == 1
    assert rows["summary"]["dide"] == {"mean": pytest.approx(0.7), "min": 0.5, "max": 0.9, "n_seeds": 3}
    assert merged["seeds"] == 3 and merged["date"] == "2026-12-01 to 2026-12-03"
    assert "| scenes-vqa | vqa | 0.500 | 0.700 [0.500, 0.900] |" in (tmp_path / "merged.md").read_text()
    # A merged report merged again: its range of days, widened by the new report's day.
    b.write_text(json.dumps(report("easy-vqa", 0.5, teacher="T", date="2026-12-05")))
    merged_path = str(tmp_path / "merged.json")
    assert accuracy.main(["--merge", merged_path, str(b), "--out", str(tmp_path), "--name", "again"]) == 0
    assert json.loads((tmp_path / "again.json").read_text())["date"] == "2026-12-01 to 2026-12-05"

    with pytest.raises(SystemExit, match="dide seed 0 is in more than one report"):
        accuracy.main(["--merge", str(a), str(a), "--out", str(tmp_path)])
    b.write_text(json.dumps(report("scenes-vqa", 0.6, teacher="T", first_seed=2) | {"variants": []}))
    with pytest.raises(SystemExit, match="its teacher differs"):
        accuracy.main(["--merge", str(a), str(b), "--out", str(tmp_path)])


def test_merge_joins_two_stage_seeds_with_their_own_teachers_and_stage_one(tmp_path):
    """--two-stage trains every seed's ITM teacher, stage 1 and task teacher: seeds run apart are joined, all three."""
    paths = []
    for seed, acc in ((0, 0.5), (1, 0.7)):
        r = report("scenes-entailment", acc, two_stage=True, itm_epochs=3, pretrain_epochs=2, first_seed=seed)
        rows = r["datasets"]["scenes-entailment"]
        rows["runs"] = {col: [{"seed": seed, "accuracy": acc, "n": 10, "command": "c"}] for col in ("teacher", "dide")}
        rows["stage1"] = {k: [{"seed": seed, "accuracy": acc + 0.1, "command": "c"}] for k in ("itm-teacher", "stage1")}
        paths.append(tmp_path / f"s{seed}.json")
        paths[-1].write_text(json.dumps(r))
    assert accuracy.main(["--merge", *map(str, paths), "--out", str(tmp_path), "--name", "merged"]) == 0
    rows = json.loads((tmp_path / "merged.json").read_text())["datasets"]["scenes-entailment"]
    assert [r["seed"] for r in rows["stage1"]["stage1"]] == [0, 1] and len(rows["runs"]["teacher"]) == 2
    table = (tmp_path / "merged.md").read_text()
    assert "| scenes-entailment | vqa | 0.600 [0.500, 0.700] | 0.600 [0.500, 0.700] |" in table
    assert "| scenes-entailment | 0.700 [0.600, 0.800] | 0.700 [0.600, 0.800] |" in table
    # Another variant of seed 1 run as its own process: the same teacher and stage 1, counted once.
    other = json.loads(paths[1].read_text())
    runs = other["datasets"]["scenes-entailment"]["runs"]
    runs["dide-2stage"] = [{**runs.pop("dide")[0], "accuracy": 0.9}]
    paths.append(tmp_path / "s1-2stage.json")
    paths[-1].write_text(json.dumps(other))
    assert accuracy.main(["--merge", *map(str, paths), "--out", str(tmp_path), "--name", "merged"]) == 0
    rows = json.loads((tmp_path / "merged.json").read_text())["datasets"]["scenes-entailment"]
    assert [r["seed"] for r in rows["runs"]["teacher"]] == [0, 1]
    assert [r["seed"] for r in rows["stage1"]["stage1"]] == [0, 1]
    assert [r["accuracy"] for r in rows["runs"]["dide-2stage"]] == [0.9]
    # A stage 1 of seed 1 that is not the same model is refused.
    other["datasets"]["scenes-entailment"]["stage1"]["itm-teacher"][0]["accuracy"] = 0.81
    paths[-1].write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="its itm-teacher of seed 1 differs between the reports"):
        accuracy.main(["--merge", *map(str, paths), "--out", str(tmp_path)])
