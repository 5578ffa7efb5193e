"""Smoke tests of the benchmarks at tiny sizes: the files they write, the open-loop generator, the FLOP counts."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from bench import flops, latency, load, loadgen, run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_header(report: dict, benchmark: str) -> None:
    assert report["benchmark"] == benchmark
    assert report["command"].startswith(f"python -m bench.{benchmark} ")
    assert report["date"][:2] == "20"
    machine = report["machine"]
    assert machine["cpu"] and machine["cores"] >= 1 and machine["execution_provider"]
    assert {"python", "torch", "onnxruntime"} <= set(report["versions"])


def check_files(out: Path, name: str) -> dict:
    assert (out / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / f"{name}.md").read_text().strip()
    return json.loads((out / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """latency and flops in quick mode at the tiny size, into one results directory (bundles shared)."""
    out = tmp_path_factory.mktemp("results")
    work = tmp_path_factory.mktemp("work")
    common = ["--quick", "--sizes", "tiny", "--batches", "1", "4", "--work", str(work), "--out", str(out)]
    # At batch 4 only the calls under 0.002 GFLOP run: the cached students with the padding trimmed.
    assert latency.main([*common, "--max-gflop", "0.002"]) == 0
    assert flops.main([*common, "--matmul-n", "256"]) == 0
    return out


def test_latency_writes_every_variant_with_ratios(results: Path) -> None:
    report = check_files(results, "latency")
    check_header(report, "latency")
    assert 6 <= report["request"]["tokens"] <= 14
    assert [(g["size"], g["batch"]) for g in report["groups"]] == [("tiny", 1), ("tiny", 4)]
    one, four = report["groups"]
    rows = {r["variant"]: r for r in one["rows"]}
    assert len(rows) == 16 and one["rounds"] >= 3 and not one["skipped"]
    assert rows[latency.TEACHER]["speedup_vs_teacher"] == pytest.approx(1.0)
    for r in rows.values():
        assert r["median_ms"] > 0 and r["samples"] == len(r["round_ms"]) == one["rounds"]
        # every speed-up is against the teacher on the same runtime, precision and text length
        ref = rows[r["teacher_reference"]]
        assert ref["model"] == "teacher" and ref["runtime"] == r["runtime"] and r["speedup_vs_teacher"] > 0
        assert ref["variant"].endswith(latency.TRIMMED) == r["variant"].endswith(latency.TRIMMED)
    # ONNX Runtime fp32 answers as torch does, teacher and student; int8 differs a little
    assert rows["student, image cached, onnxruntime fp32"]["max_abs_logit_diff_vs_torch"] < 1e-4
    assert rows["teacher fusion, onnxruntime fp32"]["max_abs_logit_diff_vs_torch"] < 1e-4
    assert rows["teacher fusion, onnxruntime fp32, padding trimmed"]["max_abs_logit_diff_vs_torch"] < 1e-4
    assert rows["teacher fusion, onnxruntime int8, padding trimmed"]["max_abs_logit_diff_vs_torch"] < 0.1
    assert rows["student, image in request, onnxruntime int8"]["max_abs_logit_diff_vs_torch"] < 0.1
    # padding trimmed to the question's tokens: the same answer (padded keys are masked), fewer FLOPs
    trimmed = rows["student, image cached, onnxruntime fp32, padding trimmed"]
    assert trimmed["max_abs_logit_diff_vs_torch"] < 1e-4
    assert trimmed["gflop"] < rows["student, image cached, onnxruntime fp32"]["gflop"]
    cached = rows["student, image cached, torch"]["gflop"]
    assert cached < rows["student, image in request, torch"]["gflop"] < rows[latency.TEACHER]["gflop"] * 2
    # batch 4 over the FLOP limit: the skipped variants are listed, the rest measured without a teacher ratio
    assert {r["variant"] for r in four["rows"]} == {
        "student, image cached, onnxruntime fp32, padding trimmed",
        "student, image cached, onnxruntime int8, padding trimmed",
    }
    assert len(four["skipped"]) == 14 and all(s["gflop"] > 0.002 for s in four["skipped"])
    assert all("speedup_vs_teacher" not in r and r["median_ms"] > 0 for r in four["rows"])


def test_flops_fraction_of_peak(results: Path) -> None:
    report = check_files(results, "flops")
    check_header(report, "flops")
    assert report["peak"]["peak_gflops"] >= max(report["peak"]["torch_gflops"], report["peak"]["numpy_gflops"]) * 0.5
    rows = report["rows"]
    assert {(r["tower"], r["runtime"], r["batch"]) for r in rows} == {
        (t, rt, b) for t in ("text", "image") for rt in ("torch", "onnxruntime") for b in (1, 4)
    }
    for r in rows:
        assert 0 < r["fraction_of_peak"] < 5 and r["achieved_gflops"] > 0
        if "flops_counted_at_batch" in r:
            assert r["flops_counted_at_batch"]["flops"] == r["flops"]
    tiny = report["sizes"]["tiny"]
    assert tiny["teacher_flops_counted"] == tiny["teacher_flops_per_request"]


def test_analytic_flops_match_flop_counter() -> None:
    """The analytic counts equal torch's FlopCounterMode for each tower and the head, at batch 3."""
    import torch

    from training.student import DualEncoderStudent, tiny_config

    cfg = tiny_config("vqa", 13, 100)
    cfg.text_layers = 1  # a text tower shallower than the image tower
    model = DualEncoderStudent(cfg).eval()
    ids, mask = torch.randint(5, 100, (3, cfg.max_text_len)), torch.ones(3, cfg.max_text_len, dtype=torch.long)
    pixels = torch.zeros(3, 3, cfg.image_size, cfg.image_size)
    d = torch.zeros(3, cfg.hidden_size)
    assert flops.counted_flops(lambda: model.encode_text(ids, mask)) == flops.text_tower_flops(cfg, 3)
    assert flops.counted_flops(lambda: model.encode_image(pixels)) == flops.image_tower_flops(cfg, 3)
    assert flops.counted_flops(lambda: model.head(d, d)) == flops.head_flops(cfg, 3)


def test_arrival_times_are_bounded_and_drawn_in_advance() -> None:
    fixed = loadgen.arrival_times(100.0, 0.5, 1000, "fixed")
    assert len(fixed) == 50 and np.allclose(np.diff(fixed), 0.01)
    poisson = loadgen.arrival_times(1000.0, 2.0, 10_000, "poisson", seed=1)
    assert 1800 < len(poisson) < 2200 and poisson.max() < 2.0 and np.all(np.diff(poisson) > 0)
    assert len(loadgen.arrival_times(1000.0, 2.0, 30, "poisson")) == 30  # bounded in count too
    with pytest.raises(ValueError, match="arrivals"):
        loadgen.arrival_times(10.0, 1.0, 10, "burst")


async def _slow_server(delay_s: float) -> tuple[asyncio.AbstractServer, int]:
    """A real HTTP/1.1 server on 127.0.0.1 that answers every request after delay_s (keep-alive)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length")
                    ),
                    0,
                )
                await reader.readexactly(length)
                await asyncio.sleep(delay_s)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_generator_is_open_loop() -> None:
    """Against a server that takes 300 ms per answer, 20 requests due over 0.5 s are all sent on time
    (a closed-loop client with the same connections would have sent a handful); with only 2 connections,
    the wait for a free connection counts in the latency."""

    async def scenario() -> tuple[list[loadgen.Outcome], list[float], list[loadgen.Outcome]]:
        server, port = await _slow_server(0.3)
        async with server:
            client = loadgen.RawClient(f"http://127.0.0.1:{port}")
            times = loadgen.arrival_times(40.0, 0.5, 100, "fixed")
            wide, lags = await loadgen.open_loop(client, "/x", lambda i: b"{}", times, connections=64, drain_s=5.0)
            narrow, _ = await loadgen.open_loop(client, "/x", lambda i: b"{}", times, connections=2, drain_s=0.5)
            assert await client.request("GET", "/x") == 200  # connections cut by the drain were replaced
            await client.aclose()
        return wide, lags, narrow

    wide, lags, narrow = asyncio.run(scenario())
    assert len(wide) == 20 and all(o.status == 200 for o in wide)
    assert max(o.sent - o.due for o in wide) < 0.15 and max(lags) < 0.15  # sent when due, not when answered
    assert all(o.done - o.due >= 0.29 for o in wide)
    summary = loadgen.summarize(narrow, [0.0], 0.5)
    assert summary["errors"].get("unfinished", 0) > 0  # cut at the end of the drain, counted as errors
    finished = [o for o in narrow if o.status == 200]
    assert max(o.done - o.due for o in finished) > 0.6  # queued behind 2 connections: latency from due time
    assert summary["client_wait_p50_ms"] > 0


def test_raw_client_resends_on_an_idle_connection_the_server_closed() -> None:
    """Like uvicorn after its keep-alive timeout: the server answers once, then closes; the next request must not
    fail (a generator that counted that as an error would blame the service), and a real failure still raises."""

    async def scenario() -> list[int | str]:
        async def answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(answer_once, "127.0.0.1", 0)
        client = loadgen.RawClient(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        got: list[int | str] = []
        async with server:
            for _ in range(3):
                got.append(await client.request("GET", "/x"))
                await asyncio.sleep(0.05)  # the close reaches the client's idle connection
        try:
            await client.request("GET", "/x")  # nobody listens any more
        except OSError as e:
            got.append(type(e).__name__)
        await client.aclose()
        return got

    got = asyncio.run(scenario())
    assert got[:3] == [200, 200, 200] and got[3] == "ConnectionRefusedError"


@pytest.mark.parametrize("flag", ["--overhead-runs", "--overhead-requests"])
def test_load_refuses_a_count_under_one(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        load.main([flag, "0"])
    assert e.value.code == 2 and f"{flag} must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.slow
def test_load_quick_against_real_servers(tmp_path: Path) -> None:
    args = ["--quick", "--size", "tiny", "--duration", "0.5", "--fractions", "0.2", "--overhead-requests", "5"]
    args += ["--overhead-runs", "2"]
    assert load.main([*args, "--work", str(tmp_path), "--out", str(tmp_path)]) == 0
    report = check_files(tmp_path, "load")
    check_header(report, "load")
    assert report["open_loop"] is True and "open-loop" in (tmp_path / "load.md").read_text()
    overhead, capacity = report["overhead"], report["capacity"]
    assert set(overhead["overhead_p50_ms"]) == {"batching on", "batching off"} and overhead["runs"] == 2
    for name, runs in overhead["overhead_p50_ms_runs"].items():  # two runs, each with its own servers
        assert len(runs) == 2 and min(runs) <= overhead["overhead_p50_ms"][name] <= max(runs)
    assert capacity["throughput_rps"]["batching on"] > 0
    for b in capacity["breakdown"].values():  # where the time goes, from /proc and the servers' /metrics
        assert b["requests"] > 0 and b["server_loop_cpu_ms"] > 0 and b["client_cpu_ms"] > 0
        assert b["stage_ms"]["text_encode"] > 0 and b["server_ms"] > b["stage_ms"]["text_encode"]
    low = report["low_load"]  # paired runs at low load, both servers each time
    assert len(low["ratios"]) == 2 and all(len(v) == 2 for v in low["p95_ms"].values())
    assert (
        "loop CPU ms" in (tmp_path / "load.md").read_text() and "p95 at low load" in (tmp_path / "load.md").read_text()
    )
    assert {(r["server"], r["images"]) for r in report["sweep"]} == {
        (s, i) for s in ("batching on", "batching off") for i in ("cached", "uploaded")
    }
    for r in report["sweep"]:
        assert r["ok"] > 0 and r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"] <= r["max_ms"]
        assert 0 <= r["error_ratio"] <= 1 and r["throughput_rps"] > 0


def test_run_report_and_readme_match_the_json(results: Path, tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nbefore\n\n{run.START}\nstale\n{run.END}\n\nafter\n")
    assert run.main(["--report-only", "--out", str(results), "--readme", str(readme)]) == 0
    summary = json.loads((results / "summary.json").read_text())
    assert {t["status"] for t in summary["targets"]} <= {"met", "missed", "not measured"}
    by_name = {t["target"]: t for t in summary["targets"]}
    assert by_name["speed-up fp32"]["status"] != "not measured"  # tiny latency results are there
    assert "teacher" in by_name["speed-up deployable"]["measured"]
    assert "tiny" in by_name["speed-up fp32"]["note"]
    text = readme.read_text()
    assert text.startswith("# Title\n\nbefore\n") and text.endswith("\nafter\n") and "stale" not in text
    for t in summary["targets"]:
        assert t["measured"] in text and t["goal"] in text
    report = (results / "report.md").read_text()
    assert "## Targets" in report and "![latency](latency.png)" in report
    without = tmp_path / "OTHER.md"
    without.write_text("no markers\n")
    assert run.main(["--report-only", "--out", str(results), "--readme", str(without)]) == 0
    assert without.read_text() == "no markers\n"


def test_accuracy_targets_leave_out_tasks_whose_teacher_is_at_chance() -> None:
    def summary(**means: float) -> dict:
        return {k.replace("_", "-"): {"mean": v, "min": v, "max": v, "n_seeds": 1} for k, v in means.items()}

    def stopped(*kept_of_run: tuple[int, int]) -> dict:  # the DiDE runs' (kept epoch, epochs run)
        return {"dide": [{"stopping": {"epoch": kept, "epochs_run": run}} for kept, run in kept_of_run]}

    chance = {"task": "entailment", "summary": summary(teacher=0.334, dide=0.334, pred_kd=0.334, text_only=0.334)}
    learned = {
        "task": "reasoning",
        "summary": summary(teacher=0.9, dide=0.85, pred_kd=0.83, image_only=0.6),
        "runs": stopped((3, 5), (4, 6)),
    }
    vqa = {"task": "vqa", "summary": summary(teacher=0.8, dide=0.795)}
    base = {"size": "small", "max_train": 6400, "student_epochs": 1, "patience": 2}
    reports = [
        ("accuracy", {**base, "datasets": {"scenes-entailment": chance, "scenes-reasoning": learned}}),
        ("accuracy-x", {**base, "datasets": {"easy-vqa": vqa}}),
    ]
    gap, gain = run.accuracy_targets(reports)
    assert gap["status"] == "missed" and "+5.0 pt below" in gap["measured"] and "+0.5 pt below" in gap["measured"]
    assert "scenes-entailment" not in gap["measured"] and "left out, scenes-entailment" in gap["note"]
    assert "chance 0.333" in gap["note"] and "text-only 0.334" in gap["note"]
    assert gain["status"] == "met" and "+2.0 pt" in gain["measured"]  # only the informative relational task counts
    # A fixed budget: its gain counts; its gap to the teacher counts only when within 1 point.
    fixed = {"scenes-reasoning": {**learned, "runs": {}}, "easy-vqa": vqa}
    gap, gain = run.accuracy_targets([("accuracy-y", {**base, "patience": 0, "datasets": fixed})])
    assert (
        gap["status"] == "met"
        and gap["measured"].startswith("easy-vqa (accuracy-y.json")
        and "+0.5 pt" in gap["measured"]
    )
    assert (
        "left out, scenes-reasoning (accuracy-y.json" in gap["note"]
        and "5.0 pt below after a fixed budget" in gap["note"]
    )
    assert gain["status"] == "met" and "+2.0 pt" in gain["measured"]
    # Trained with --patience but cut off while still improving (one run kept its last epoch): left out too.
    capped = {"scenes-reasoning": {**learned, "runs": stopped((3, 5), (6, 6))}}
    gap, _ = run.accuracy_targets([("accuracy-z", {**base, "datasets": capped})])
    assert gap["status"] == "not measured" and "still improving when its budget ended" in gap["note"]
    _, gain = run.accuracy_targets([("accuracy", {**base, "datasets": {"scenes-entailment": chance}})])
    assert gain["status"] == "measured, not informative"
    _, gain = run.accuracy_targets([("accuracy", {**base, "datasets": {"easy-vqa": vqa}})])
    assert gain["status"] == "not measured"  # no relational task at all, informative or not
    assert [t["status"] for t in run.accuracy_targets([])] == ["not measured", "not measured"]


def test_deployable_speedup_is_decided_only_when_every_int8_case_agrees() -> None:
    """int8 deployability is not measured: met or missed only if all four cases say so, else "not measured"."""

    def latency_at(student_ms: dict[str, float], teacher_ms: dict[str, float]) -> dict:
        rows = [
            {"variant": name.format(p), "median_ms": ms, "round_ms": [ms] * 3}
            for name, times in ((run.STUDENT, student_ms), (run.TEACHER, teacher_ms))
            for p, ms in times.items()
        ]
        groups = [{"size": "base", "batch": 1, "rows": rows}]
        return {"request": {"tokens": 8, "text_len": 16}, "shallow_text_layers": 2, "groups": groups}

    def statuses(student_ms: dict[str, float], teacher_ms: dict[str, float]) -> tuple[str, str]:
        fp32, best = run.latency_targets(latency_at(student_ms, teacher_ms))
        return fp32["status"], best["status"]

    assert statuses({"fp32": 20, "int8": 10}, {"fp32": 700, "int8": 700}) == ("met", "met")  # 35x at worst
    assert statuses({"fp32": 50, "int8": 20}, {"fp32": 800, "int8": 900}) == ("met", "not measured")  # 16x or 40x
    assert statuses({"fp32": 60, "int8": 30}, {"fp32": 800, "int8": 600}) == ("missed", "missed")  # 26.7x at best


def test_frontier_target_is_met_only_by_the_recommended_configuration() -> None:
    def case(student: str, speedup: float) -> dict:
        return {"student": student, "trained": student, "accuracy": 0.9, "teacher": "teacher, int8",
                "teacher_accuracy": 0.91, "speedup": speedup}  # fmt: skip

    fast, full = case("student, 2 text layers, int8", 43.0), case("student, 12 text layers, int8", 8.5)
    missed = run.frontier_target({"analysis": {"base_speedups": {"any_depth": fast, "recommended": full}}})
    assert missed["status"] == "missed" and "8.5x" in missed["measured"] and "43.0x" in missed["note"]
    met = run.frontier_target({"analysis": {"base_speedups": {"any_depth": fast, "recommended": fast}}})
    assert met["status"] == "met" and met["note"] == ""
    assert run.frontier_target(None)["status"] == "not measured"


def test_scenes_figure_shows_one_example_per_template(tmp_path, monkeypatch):
    from PIL import Image

    from bench import scenes_figure

    monkeypatch.setenv("DIDE_DATA_DIR", str(tmp_path / "data"))
    out = tmp_path / "scenes.png"
    assert scenes_figure.main(["--per-task", "2", "--test-images", "8", "--out", str(out)]) == 0
    with Image.open(out) as img:
        assert img.width > 300 and img.height > 300
    kinds = [ex.kind for ex in scenes_figure.pick("reasoning", 3, 8)]
    assert len(kinds) == len(set(kinds)) == 3


def test_fusion_oracle_trains_the_students_head_on_perfect_embeddings(tmp_path):
    from bench import fusion_oracle

    argv = ["--tasks", "reasoning", "--epochs", "2", "--train", "30", "--test", "10", "--facts", "--out", str(tmp_path)]
    assert fusion_oracle.main(argv) == 0
    report = json.loads((tmp_path / "fusion_oracle.json").read_text())
    runs = [(r["task"], r["fusion"]) for r in report["runs"]]
    assert runs == [("reasoning", f) for f in ("concat", "concat + facts", "product", "product + facts")]
    for one in report["runs"]:
        assert [c["epoch"] for c in one["curve"]] == [1, 2]
        assert all(0.0 <= c["test_accuracy"] <= 1.0 and c["by_kind"] for c in one["curve"])
    assert (tmp_path / "fusion_oracle.png").stat().st_size > 0
    assert "| reasoning | product + facts |" in (tmp_path / "fusion_oracle.md").read_text()


def test_attention_figure_draws_teacher_and_students_and_measures_their_kl(tmp_path, monkeypatch):
    import torch

    from bench import attention_figure
    from training import train
    from training.student import save_student
    from training.teacher import load_teacher, student_from_teacher

    monkeypatch.setenv("DIDE_DATA_DIR", str(tmp_path / "data"))
    teacher_dir = tmp_path / "teacher"
    common = ["--task", "entailment", "--data", "scenes:train=6,test=4", "--size", "tiny", "--epochs", "1"]
    assert train.main(["teacher", *common, "--batch-size", "8", "--out", str(teacher_dir)]) == 0
    teacher = load_teacher(teacher_dir)
    # A student that starts from the teacher, and a random one: the first is the closer to its attention.
    near = student_from_teacher(teacher)
    far = student_from_teacher(teacher)
    for p in far.parameters():
        torch.nn.init.normal_(p, std=0.5)
    for name, model in (("near", near), ("far", far)):
        save_student(model.eval(), tmp_path / name, labels=teacher.labels, tokenizer=teacher.text.tokenizer,
                     image_spec=teacher.image_spec, data=teacher.data)  # fmt: skip
    students = ["--student", f"near={tmp_path / 'near'}", "--student", f"far={tmp_path / 'far'}"]
    out = tmp_path / "out"
    argv = ["--teacher", str(teacher_dir), *students, "--examples", "3", "--kl-limit", "12", "--out", str(out)]
    with pytest.raises(SystemExit):  # argparse: "--student takes NAME=DIR"
        attention_figure.main(["--teacher", str(teacher_dir), "--student", str(tmp_path / "near")])
    assert attention_figure.main(argv) == 0
    report = json.loads((tmp_path / "out" / "attention.json").read_text())
    assert report["kl_examples"] == 12 and set(report["kl"]) == {"near", "far"}
    assert 0 <= report["kl"]["near"]["t2i"] < report["kl"]["far"]["t2i"]
    assert (tmp_path / "out" / "attention.png").stat().st_size > 0
    assert "| near (" in (tmp_path / "out" / "attention.md").read_text()


def test_frontier_exports_trained_students_and_marks_the_pareto_front(tmp_path, monkeypatch, capsys):
    from bench import frontier
    from training import train

    monkeypatch.setenv("DIDE_DATA_DIR", str(tmp_path / "data"))
    teacher = tmp_path / "teacher"
    common = ["--task", "vqa", "--data", "scenes:train=8,test=4", "--epochs", "1", "--batch-size", "8"]
    assert train.main(["teacher", *common, "--size", "tiny", "--out", str(teacher)]) == 0
    students = []
    for depth in (2, 1):  # the tiny teacher has 2 layers: a full-depth and a 1-layer text tower
        students.append(tmp_path / f"text{depth}")
        flags = ["--text-layers", str(depth), "--out", str(students[-1])]
        assert train.main(["distill", *common, "--teacher", str(teacher), *flags]) == 0
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["--teacher", str(teacher), "--students", *map(str, students), "--batches", "1", "2", "--rounds", "3"]
    argv += ["--base-size", "tiny", "--work", str(work), "--out", str(out)]
    assert frontier.main(argv) == 0
    report = check_files(out, "frontier")
    check_header(report, "frontier")
    models = report["trained"]["models"]
    # Every model in both precisions, each evaluated on the whole test split by its own dide-export.
    assert {(m["model"], m["text_layers"], m["precision"]) for m in models} == {
        (m, d, p) for m, d in (("teacher", None), ("student", 2), ("student", 1)) for p in ("fp32", "int8")
    }
    n = models[0]["examples"]
    assert all(m["examples"] == n and 0.0 <= m["accuracy"] <= 1.0 for m in models)
    assert sorted(p.name for p in work.iterdir() if p.is_dir()) == [
        "student-text1-fp32", "student-text1-int8", "student-text2-fp32", "student-text2-int8", "tiny"
    ]  # fmt: skip
    for group in report["trained"]["groups"]:
        rows = {r["variant"]: r for r in group["rows"]}
        assert len(rows) == 6 and all(r["per_request_ms"] > 0 for r in rows.values())
        assert "speedup_vs_teacher" in rows["student, 1 text layer, int8"]
    points = report["analysis"]["points"]
    assert any(p["pareto"] for p in points)
    for p in points:  # a point is on the front exactly when no other is at least as good on both axes
        dominated = any(
            q["accuracy"] >= p["accuracy"] and q["latency_ms"] <= p["latency_ms"] and q != p
            and (q["accuracy"], q["latency_ms"]) != (p["accuracy"], p["latency_ms"]) for q in points
        )  # fmt: skip
        assert p["pareto"] == (not dominated)
    base = {r["variant"] for g in report["base"]["groups"] for r in g["rows"]}
    assert "student, 1 text layer, int8" in base and "teacher, fp32" in base
    assert "teacher, fp32" not in {r["variant"] for r in report["base"]["groups"][1]["rows"]}  # batch 2: students
    assert report["base"]["stands_for"] == {"2": 2, "1": 1}  # the same fractions of the (tiny) teacher's depth
    speedups = report["analysis"]["base_speedups"]
    assert speedups["any_depth"]["speedup"] > 0 and speedups["any_depth"]["teacher"].startswith("teacher, ")
    # Students of another teacher, or two of one depth, are refused with the reason.
    capsys.readouterr()
    other = ["--teacher", str(students[0]), "--students", str(students[1]), "--out", str(tmp_path / "x")]
    assert frontier.main(other) == 2
    assert "not " + str(students[0]) in capsys.readouterr().err
    twice = ["--teacher", str(teacher), "--students", str(students[1]), str(students[1]), "--out", str(tmp_path / "x")]
    assert frontier.main(twice) == 2
    assert "same text depth" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_gpu_check_travels_without_weights_and_runs_beside_the_cpu(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bench import gpu

    graphs, out = tmp_path / "graphs", tmp_path / "out"
    graphs.mkdir()
    with pytest.raises(SystemExit) as e:  # a folder `prepare` has not filled
        gpu.main(["run", "--graphs", str(graphs)])
    assert e.value.code == 2 and "no graphs there" in capsys.readouterr().err
    assert gpu.main(["prepare", "--graphs", str(graphs), "--sizes", "tiny"]) == 0
    tiny = graphs / "tiny"
    request = json.loads((tiny / "request.json").read_text())
    for name in gpu.GRAPHS:
        assert request["weight_bytes"][name] > 0 and not (tiny / f"{name}.weights").exists()
    with pytest.raises(SystemExit) as e:
        gpu.main(["run", "--graphs", str(graphs), "--bundles", str(tmp_path / "none")])
    assert e.value.code == 2 and "--bundles" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="has no CUDAExecutionProvider"):  # this CPU build cannot pass for a GPU
        gpu.main(["run", "--graphs", str(graphs), "--out", str(out)])
    # The CPU provider standing in for the accelerator: every step runs, and both sides agree exactly.
    argv = ["run", "--graphs", str(graphs), "--out", str(out), "--provider", gpu.CPU, "--rounds", "3"]
    assert gpu.main(argv) == 0
    for name in gpu.GRAPHS:  # the random weights written back fill exactly what was stripped
        assert (tiny / f"{name}.weights").stat().st_size == request["weight_bytes"][name]
    report = check_files(out, "gpu")
    check_header(report, "gpu")
    assert not (out / "gpu.partial.json").exists()
    assert {b["bundle"] for b in report["demo_bundles"]} == {"vqa", "entailment", "reasoning"}
    for b in report["demo_bundles"]:
        assert b["provider"] == gpu.CPU and b["logits_rel_diff"] == 0.0 and b["argmax_agree"] == 1.0
    (size,) = report["sizes"]
    assert size["size"] == "tiny" and [b["batch"] for b in size["batches"]] == [1, gpu.LARGE_BATCH["tiny"]]
    assert all(p["kernels"][gpu.CPU] > 0 for p in size["placement"].values())
    assert all(d == 0.0 for d in size["gpu_vs_cpu_rel_diff"].values())
    for b in size["batches"]:
        assert len(b["variants"]) == 6 and all(v["median_ms"] > 0 for v in b["variants"].values())
        assert all(r > 0 for r in b["ratios"].values())
