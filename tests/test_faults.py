"""Faults: damaged bundle and store files stop start-up, named; kill -9 and a full disk during `dide-cache build`."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import easy_vqa
import numpy as np
import pytest
from fastapi.testclient import TestClient

from bench.soak import record_reliability
from export.cache_cli import list_images, main
from export.runtime import Bundle
from export.store import EmbeddingStore
from service.app import create_app
from service.settings import Settings
from tests.live import QUESTION, REPO, b64, png, run_until_exit, wait_for_rows

EASY_VQA = Path(next(iter(easy_vqa.get_test_image_paths().values()))).parent
KILLS = 20
KILL_IMAGES = 60
KILL_BATCH = 2  # a commit every two images: most of a build's time is spent committing
KILL_LOOP_BUDGET_S = 240  # a hard bound on the loop; it takes about a minute on a quiet 2-core machine


def model_id(bundle: Path) -> str:
    return json.loads((bundle / "manifest.json").read_text())["model_id"]


def flip_byte(path: Path, offset: int) -> None:
    """Change one byte in place: same size, different content (what a sha256 check must catch)."""
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


def damage(path: Path, kind: str) -> None:
    if kind == "missing":
        path.unlink()
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "tampered":
        flip_byte(path, path.stat().st_size // 2)
    else:
        raise ValueError(kind)


# --- bundle files: the real server refuses to start and its log names the file --------------------------

BUNDLE_FAULTS = [
    ("missing", "tokenizer.json", "cannot read it"),
    ("truncated", "image_encoder.onnx", "sha256 does not match the manifest"),
    ("tampered", "labels.json", "sha256 does not match the manifest"),
    ("tampered", "head.onnx", "sha256 does not match the manifest"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "name", "says"), BUNDLE_FAULTS, ids=[f"{k}-{n}" for k, n, _ in BUNDLE_FAULTS])
def test_a_damaged_bundle_file_stops_the_server_naming_it(
    tiny_bundle: Path, tmp_path: Path, kind: str, name: str, says: str
) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    damage(bundle / name, kind)
    rc, log = run_until_exit({"DIDE_BUNDLES": str(bundle), "DIDE_STORE": str(tmp_path / "store")}, tmp_path / "log")
    assert rc != 0, log[-3000:]
    assert f"{bundle / name}: {says}" in log, log[-3000:]
    assert "Application startup complete" not in log
    record_reliability("faults", {f"bundle {kind} {name}": f"refused to start: exit {rc}, log names {name}"})


# --- store files: start-up refuses a damaged store, naming it ---------------------------------------------


@pytest.fixture(scope="module")
def pristine_store(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store built by `dide-cache build` over 12 easy-VQA images (with user ids and a saved index)."""
    images = tmp_path_factory.mktemp("store-images")
    for p in sorted(EASY_VQA.iterdir())[:12]:
        shutil.copyfile(p, images / p.name)
    root = tmp_path_factory.mktemp("pristine") / "store"
    assert main(["build", "--bundle", str(tiny_bundle), "--images", str(images), "--store", str(root)]) == 0
    return root


def store_copy(pristine: Path, tmp_path: Path) -> Path:
    root = tmp_path / "store"
    shutil.copytree(pristine, root)
    return root


def startup_error(bundle: Path, store: Path, **settings: object) -> str:
    """The exception the app's lifespan raises for this store, as text ('' when it starts)."""
    try:
        with TestClient(create_app(Settings(bundles=[bundle], store=store, **settings))):  # type: ignore[arg-type]
            return ""
    except Exception as e:  # the lifespan's own exception, whatever its type, is what the log would show
        return f"{type(e).__name__}: {e}"


# (file, damage, what the start-up error must contain besides the store path)
STORE_FAULTS = [
    ("vectors.f32", "truncated", "vectors.f32 is truncated"),
    ("sha256.bin", "truncated", "sha256.bin is truncated"),
    ("vectors.f32", "missing", "vectors.f32"),
    ("sha256.bin", "missing", "sha256.bin"),
    ("manifest.json", "garbage", "manifest.json cannot be read"),
    ("vectors.f32", "tampered", "vector bytes do not match the logged sha256"),
    ("user_ids.jsonl", "renamed", "user-id lines do not match the logged sha256"),
    ("index", "tampered", "does not match its sha256 in the manifest"),
]


def damage_store(directory: Path, name: str, kind: str) -> Path:
    path = next(directory.glob("index-*.faiss")) if name == "index" else directory / name
    if kind == "garbage":
        path.write_text("{not json")
    elif kind == "renamed":  # one user id changed, still valid JSON: only the commit log's sha256 shows it
        text = path.read_text()
        first = json.loads(text.splitlines()[0])["id"]
        path.write_text(text.replace(f'"{first}"', f'"{first[:-1]}X"', 1))
    else:
        damage(path, kind)
    return path


@pytest.mark.parametrize(("name", "kind", "says"), STORE_FAULTS, ids=[f"{k}-{n}" for n, k, _ in STORE_FAULTS])
def test_a_damaged_store_stops_start_up_naming_it(
    tiny_bundle: Path, pristine_store: Path, tmp_path: Path, name: str, kind: str, says: str
) -> None:
    root = store_copy(pristine_store, tmp_path)
    directory = root / model_id(tiny_bundle)
    damage_store(directory, name, kind)
    error = startup_error(tiny_bundle, root)
    assert error, "the service started on a damaged store"
    assert str(directory) in error and says in error, error
    # `dide-cache verify` refuses it too (or cannot open it), with exit status 1.
    assert main(["verify", "--store", str(root), "--bundle", str(tiny_bundle)]) == 1
    record_reliability("faults", {f"store {kind} {name}": "service refused to start naming it; verify exit 1"})


def test_verification_at_start_up_can_be_turned_off_for_huge_stores(
    tiny_bundle: Path, pristine_store: Path, tmp_path: Path
) -> None:
    root = store_copy(pristine_store, tmp_path)
    damage_store(root / model_id(tiny_bundle), "vectors.f32", "tampered")
    assert startup_error(tiny_bundle, root, verify_store=False) == ""
    assert startup_error(tiny_bundle, root) != ""


@pytest.mark.parametrize("name", ["user_ids.jsonl", "commits.jsonl"])
def test_a_store_log_that_is_not_json_is_named(
    tiny_bundle: Path, pristine_store: Path, tmp_path: Path, name: str
) -> None:
    root = store_copy(pristine_store, tmp_path)
    directory = root / model_id(tiny_bundle)
    flip_byte(directory / name, 0)  # '{' -> 'z'
    error = startup_error(tiny_bundle, root)
    assert name in error, error


def test_a_missing_store_manifest_never_loses_the_rows(tiny_bundle: Path, pristine_store: Path, tmp_path: Path) -> None:
    root = store_copy(pristine_store, tmp_path)
    directory = root / model_id(tiny_bundle)
    size = (directory / "vectors.f32").stat().st_size
    (directory / "manifest.json").unlink()
    error = startup_error(tiny_bundle, root)
    if not error:  # it started: a write must still not destroy the rows
        with TestClient(create_app(Settings(bundles=[tiny_bundle], store=root))) as c:
            assert c.post("/images", json={"image": b64(png(1))}).status_code == 200
    assert (directory / "vectors.f32").stat().st_size >= size
    assert "manifest.json" in error, error


def test_a_store_damaged_while_serving_keeps_the_old_rows_and_never_500s(
    tiny_bundle: Path, pristine_store: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    root = store_copy(pristine_store, tmp_path)
    directory = root / model_id(tiny_bundle)
    settings = Settings(bundles=[tiny_bundle], store=root, store_refresh_s=0.1)  # type: ignore[arg-type]
    stem = sorted(EASY_VQA.iterdir())[0].stem
    with TestClient(create_app(settings)) as c:
        before = c.post("/vqa", json={"image_id": stem, "question": QUESTION})
        assert before.status_code == 200
        good = (directory / "manifest.json").read_bytes()
        (directory / "manifest.json").write_text("{not json")  # hot reload now reads a damaged manifest
        time.sleep(0.5)  # several refresh rounds
        after = c.post("/vqa", json={"image_id": stem, "question": QUESTION})
        assert after.status_code == 200 and after.json()["answers"] == before.json()["answers"]
        upload = c.post("/images", json={"image": b64(png(7)), "name": "while-damaged"})
        assert upload.status_code == 200, upload.text  # kept in memory, not a 500
        assert c.get("/images/while-damaged").json()["cached"] is True
        assert "manifest.json cannot be read" in caplog.text
        (directory / "manifest.json").write_bytes(good)  # repaired: the kept vector is committed
        space = c.app.state.engine.spaces[model_id(tiny_bundle)]  # type: ignore[attr-defined]
        deadline = time.monotonic() + 10
        while space.pending and time.monotonic() < deadline:
            time.sleep(0.05)
        assert space.pending == 0
    store = EmbeddingStore.open(root, model_id(tiny_bundle), None)
    assert store.resolve("while-damaged") is not None and store.verify()[0] == []
    record_reliability("faults", {"store manifest damaged while serving": "kept serving old rows, no 5xx"})


# --- kill -9 at random points of `dide-cache build` --------------------------------------------------------


@dataclass
class Expected:
    listing: Path
    vectors: dict[str, np.ndarray]  # sha256 -> vector, every distinct decodable image
    ids: dict[str, str]  # user id -> sha256
    write_phase_s: float  # from the store's creation to the end of an uninterrupted build


def cli(*args: str | Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "export.cache_cli", *map(str, args)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def build_args(bundle: Path, listing: Path, root: Path) -> list[str]:
    where = ["--bundle", str(bundle), "--images", str(listing), "--store", str(root)]
    return ["build", *where, "--batch-size", str(KILL_BATCH), "--workers", "1", "--threads", "1"]


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_file() and process.poll() is None:
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.005)


@pytest.fixture(scope="module")
def kill_set(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Expected:
    """60 easy-VQA images, 4 copies of them under other names and 2 undecodable files; one uninterrupted build."""
    tmp = tmp_path_factory.mktemp("kill-set")
    images = sorted(EASY_VQA.iterdir())[:KILL_IMAGES]
    extra = tmp / "extra"
    extra.mkdir()
    for p in images[:4]:
        shutil.copyfile(p, extra / f"copy-{p.name}")
    (extra / "empty.png").write_bytes(b"")
    (extra / "text.png").write_text("not an image")
    listing = tmp / "images.txt"
    listing.write_text("\n".join(str(p) for p in [*images, *sorted(extra.iterdir())]) + "\n")
    root = tmp / "store"
    process = cli(*build_args(tiny_bundle, listing, root))
    wait_for(root / model_id(tiny_bundle) / "manifest.json", process)
    created = time.monotonic()
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-3000:]
    store = EmbeddingStore.open(root, model_id(tiny_bundle), None)
    assert len(store) == KILL_IMAGES and store.verify()[0] == []
    shas = store.sha256_at(range(len(store)))
    return Expected(
        listing,
        dict(zip(shas, np.array(store.vectors), strict=True)),
        store.user_ids(),
        time.monotonic() - created,
    )


def check_store(store: EmbeddingStore, expected: Expected, complete: bool) -> None:
    """verify passes; every row is an expected image with its vector, once; every id names its image."""
    problems, _ = store.verify()
    assert problems == [], problems
    shas = store.sha256_at(range(len(store)))
    assert len(set(shas)) == len(shas) and set(shas) <= set(expected.vectors)
    got = np.array(store.vectors)
    want = np.stack([expected.vectors[s] for s in shas]) if shas else got
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)  # ORT may round differently by batch composition
    ids = store.user_ids()
    assert all(expected.ids[uid] == sha for uid, sha in ids.items())
    if complete:
        assert set(shas) == set(expected.vectors) and ids == expected.ids


@pytest.mark.slow
def test_kill_9_at_random_points_of_a_build_then_rerun(tiny_bundle: Path, kill_set: Expected, tmp_path: Path) -> None:
    rng = random.Random(7)
    mid = model_id(tiny_bundle)
    outcomes = []
    started = time.monotonic()
    for i in range(KILLS):
        assert time.monotonic() - started < KILL_LOOP_BUDGET_S, f"only {i} kills in {KILL_LOOP_BUDGET_S} s"
        root = tmp_path / f"store-{i}"
        process = cli(*build_args(tiny_bundle, kill_set.listing, root))
        try:
            wait_for(root / mid / "manifest.json", process)
            if i % 4 == 0:  # anywhere in the run: before the first commit, between commits, or after the end
                time.sleep(rng.uniform(0.0, 1.1 * kill_set.write_phase_s))
            else:  # mid-build whatever this machine's speed: after a random committed row count, then a jitter
                wait_for_rows(root, mid, rng.randint(1, KILL_IMAGES - KILL_BATCH), process)
                time.sleep(rng.uniform(0.0, kill_set.write_phase_s * KILL_BATCH / KILL_IMAGES))
            seen = len(EmbeddingStore.open(root, mid, None))  # committed rows a reader saw before the kill
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
        finally:
            process.kill()
            process.communicate()
        store = EmbeddingStore.open(root, mid, None)
        at_kill = len(store)
        assert at_kill >= seen, f"kill {i}: {seen} rows were committed, {at_kill} are left"
        check_store(store, kill_set, complete=False)
        assert main(build_args(tiny_bundle, kill_set.listing, root)) == 0  # the rerun completes
        store.refresh()
        check_store(store, kill_set, complete=True)
        assert main(["verify", "--store", str(root)]) == 0
        outcomes.append({"killed": process.returncode == -signal.SIGKILL, "rows_at_kill": at_kill})
    killed = [o for o in outcomes if o["killed"]]
    mid_build = [o for o in killed if 0 < o["rows_at_kill"] < KILL_IMAGES]
    assert len(killed) >= KILLS * 3 // 4 and len(mid_build) >= KILLS // 2, outcomes
    record_reliability(
        "faults",
        {
            "kill -9 of dide-cache build": {
                "iterations": KILLS,
                "killed": len(killed),
                "killed_mid_build_with_rows_committed": len(mid_build),
                "finished_before_the_kill": KILLS - len(killed),
                "images": f"{KILL_IMAGES} distinct + 4 duplicate copies + 2 undecodable, batch {KILL_BATCH}",
                "after_kill": "verify passed every time; no committed row lost, none duplicated",
                "rerun": "completed every time; rows, vectors and user ids equal an uninterrupted build",
                "seconds": round(time.monotonic() - started, 1),
            }
        },
    )


# --- a full disk during a build ------------------------------------------------------------------------------


@contextlib.contextmanager
def small_disk(directory: Path, size: int) -> Iterator[tuple[str, Callable[[], None] | None, Callable[[], None]]]:
    """A `size`-byte filesystem at `directory`: (how, the child's preexec_fn, make room).

    As root, a tmpfs of that size (a real ENOSPC); elsewhere, RLIMIT_FSIZE in the child (EFBIG on the write
    that would pass `size` bytes in one file), the nearest an unprivileged process can get.
    """
    directory.mkdir(parents=True)
    try:
        mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)]
        mounted = subprocess.run(mount, capture_output=True, check=False).returncode == 0
    except OSError:  # no mount(8) here
        mounted = False
    if mounted:

        def grow() -> None:
            subprocess.run(["mount", "-o", "remount,size=64m", str(directory)], check=True)

        try:
            yield f"tmpfs of {size // 1024} KiB", None, grow
        finally:
            subprocess.run(["umount", "--lazy", str(directory)], check=False)
        return

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the child
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 4, size // 4))

    yield f"RLIMIT_FSIZE of {size // 4 // 1024} KiB per file", limit, lambda: None


@pytest.mark.slow
def test_a_full_disk_mid_build_is_a_clear_error_and_keeps_committed_rows(tiny_bundle: Path, tmp_path: Path) -> None:
    images = sorted(EASY_VQA.iterdir())[:400]
    listing = tmp_path / "images.txt"
    listing.write_text("\n".join(map(str, images)) + "\n")
    mid = model_id(tiny_bundle)
    with small_disk(tmp_path / "disk", 96 * 1024) as (how, preexec, grow):
        root = tmp_path / "disk" / "store"
        args = ["build", "--bundle", str(tiny_bundle), "--images", str(listing), "--store", str(root)]
        run = subprocess.run(
            [sys.executable, "-m", "export.cache_cli", *args, "--batch-size", "16"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
            preexec_fn=preexec,
        )
        error = "No space left on device" if how.startswith("tmpfs") else "File too large"
        assert run.returncode == 1 and error in run.stderr, run.stderr[-3000:]
        assert "Traceback" not in run.stderr, run.stderr[-3000:]
        store = EmbeddingStore.open(root, mid, None)
        committed = len(store)
        assert 0 < committed < len(images), committed  # it failed mid-build, after some commits
        assert store.verify()[0] == []
        kept_keys, kept_vectors = store.sha256_at(range(committed)), np.array(store.vectors)
        np.testing.assert_allclose(kept_vectors, reference_vectors(tiny_bundle, kept_keys), atol=1e-6, rtol=0)
        grow()  # room again: the same command finishes the job
        assert main([*args, "--batch-size", "16"]) == 0
        store.refresh()
        assert len(store) == len(images) and store.verify()[0] == []
        assert store.sha256_at(range(committed)) == kept_keys  # the rows committed before are untouched
        assert np.array_equal(store.vectors[:committed], kept_vectors)
    record_reliability(
        "faults",
        {
            "disk full during dide-cache build": {
                "how": f"{how}, for a build of {len(images)} images",
                "exit_status": run.returncode,
                "message": next(line for line in run.stderr.splitlines() if error in line).split(": ", 1)[-1],
                "rows_committed_before_it": committed,
                "committed_rows": "intact (verify passed, vectors equal the runtime's)",
                "rerun_with_room": "completed",
            }
        },
    )


def reference_vectors(bundle_dir: Path, shas: list[str]) -> np.ndarray:
    """The runtime's own vectors for the easy-VQA images with these sha256s."""
    bundle = Bundle.load(bundle_dir)
    by_sha = {hashlib.sha256(it.path.read_bytes()).hexdigest(): it.path for it in list_images(str(EASY_VQA))}
    blobs = [by_sha[s].read_bytes() for s in shas]
    return np.concatenate(
        [bundle.encode_images(bundle.preprocess_images(blobs[a : a + 16])) for a in range(0, len(blobs), 16)]
    )
