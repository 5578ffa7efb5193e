"""bench.accuracy end to end at tiny size: the ablation and the two-stage rows are trained, evaluated and reported."""

from __future__ import annotations

import json

import pytest

from bench import accuracy

pytestmark = pytest.mark.slow


def test_two_stage_ablation_writes_json_markdown_and_readme(tmp_path, monkeypatch):
    monkeypatch.setenv("DIDE_DATA_DIR", str(tmp_path / "data"))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{accuracy.START}\nold\n{accuracy.END}\nrest\n")
    out = tmp_path / "results"
    argv = ["--datasets", "scenes-vqa", "--variants", "dide", "dide-2stage", "--size", "tiny",
            "--scenes", "scenes:train=12,test=8,seed=0", "--teacher-epochs", "1", "--student-epochs", "1",
            "--itm-epochs", "1", "--pretrain-epochs", "1", "--batch-size", "8", "--two-stage",
            "--work", str(tmp_path / "work"), "--out", str(out), "--readme", str(readme)]  # fmt: skip
    assert accuracy.main(argv) == 0

    report = json.loads((out / "accuracy.json").read_text())
    rows = report["datasets"]["scenes-vqa"]
    assert set(rows["runs"]) == {"teacher", "dide", "dide-2stage"}
    assert set(rows["stage1"]) == {"itm-teacher", "stage1"}
    assert rows["stage1"]["itm-teacher"][0]["task"] == "itm"
    two_stage = rows["runs"]["dide-2stage"][0]
    assert "--init" in two_stage["command"] and "stage1" in two_stage["command"]
    assert "--init" in rows["runs"]["teacher"][0]["command"]  # the task teacher starts from the ITM teacher
    for runs in rows["runs"].values():
        assert 0.0 <= runs[0]["accuracy"] <= 1.0 and runs[0]["n"] > 0
    table = (out / "accuracy.md").read_text()
    assert "DiDE, both stages" in table and "stage-1 student" in table
    assert table in readme.read_text() and "old" not in readme.read_text()


def test_two_stage_variant_needs_two_stage(tmp_path):
    with pytest.raises(SystemExit):
        accuracy.main(["--variants", "dide-2stage", "--work", str(tmp_path)])
