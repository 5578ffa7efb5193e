"""dide-cache: build over easy-VQA, verify, resume after kill -9, shard + merge, rejects, the lock, similar."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import easy_vqa
import numpy as np
import pytest

from export.cache_cli import ImageItem, list_images, main, parse_shard, shard_of
from export.runtime import Bundle
from export.store import REJECTS, VECTORS, EmbeddingStore
from tests.live import wait_for_rows

ROOT = Path(__file__).resolve().parents[1]
BATCH = 25  # divides 1,000 and 500, so shard batches line up with unsharded ones
IMAGES = Path(next(iter(easy_vqa.get_test_image_paths().values()))).parent  # the 1,000 easy-VQA test images


def model_id(bundle: Path) -> str:
    return json.loads((bundle / "manifest.json").read_text())["model_id"]


def cli(*args: str | Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "export.cache_cli", *map(str, args)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def unsharded(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> EmbeddingStore:
    """One unsharded build over the 1,000 easy-VQA test images."""
    root = tmp_path_factory.mktemp("unsharded")
    args = ["build", "--bundle", str(tiny_bundle), "--images", str(IMAGES), "--store", str(root)]
    assert main([*args, "--batch-size", str(BATCH)]) == 0
    return EmbeddingStore.open(root, model_id(tiny_bundle), None)


def test_build_over_easy_vqa_verifies_and_equals_the_runtime(
    unsharded: EmbeddingStore, tiny_bundle: Path, capsys: pytest.CaptureFixture
) -> None:
    root = unsharded.directory.parent
    assert main(["verify", "--store", str(root), "--bundle", str(tiny_bundle)]) == 0
    assert "OK" in capsys.readouterr().out
    assert len(unsharded) == 1000 and len(unsharded.user_ids()) == 1000
    # The runtime's own encode_images over the same files, in listing order, at the same batch size.
    bundle = Bundle.load(tiny_bundle)
    paths = [it.path for it in list_images(str(IMAGES))]
    expected = np.concatenate(
        [
            bundle.encode_images(bundle.preprocess_images([p.read_bytes() for p in paths[a : a + BATCH]]))
            for a in range(0, 1000, BATCH)
        ]
    )
    got, found = unsharded.get([p.stem for p in paths])
    assert found.all() and np.array_equal(got, expected)
    assert np.array_equal(unsharded.vectors, expected)  # rows were appended in listing order

    commits = len(unsharded.commits())
    assert main(["build", "--bundle", str(tiny_bundle), "--images", str(IMAGES), "--store", str(root)]) == 0
    out = capsys.readouterr().out
    assert "encoded 0 new images" in out and "skipped 1000 already cached" in out
    unsharded.refresh()
    assert len(unsharded.commits()) == commits  # a re-run commits nothing


def test_kill_9_mid_build_then_resume(unsharded: EmbeddingStore, tiny_bundle: Path, tmp_path: Path) -> None:
    # A listing with duplicate content under other names and undecodable files mixed in.
    extra = tmp_path / "extra"
    extra.mkdir()
    for i in range(20):
        shutil.copyfile(IMAGES / f"{i}.png", extra / f"copy{i}.png")
    (extra / "empty.png").write_bytes(b"")
    (extra / "text.png").write_text("not an image")
    listing = tmp_path / "images.txt"
    names = [str(p) for p in sorted(IMAGES.iterdir())] + [str(p) for p in sorted(extra.iterdir())]
    listing.write_text("\n".join(names) + "\n")
    root, mid = tmp_path / "store", model_id(tiny_bundle)

    build = cli("build", "--bundle", tiny_bundle, "--images", listing, "--store", root, "--batch-size", 5)
    try:
        store = wait_for_rows(root, mid, 50)
        build.send_signal(signal.SIGKILL)
        build.wait(timeout=30)
    finally:
        build.kill()
    store.refresh()
    assert build.returncode == -signal.SIGKILL and 50 <= len(store) < 1000  # killed mid-run
    assert len(store) % 5 == 0  # whole batches only

    args = ["build", "--bundle", str(tiny_bundle), "--images", str(listing), "--store", str(root)]
    assert main([*args, "--batch-size", str(BATCH)]) == 0
    assert main(["verify", "--store", str(root)]) == 0
    store.refresh()
    assert len(store) == 1000  # distinct decodable images: the copies add no rows
    keys = store.sha256_at(range(len(store)))
    assert len(set(keys)) == 1000 and set(keys) == set(unsharded.sha256_at(range(1000)))
    got, found = store.get(keys)
    assert found.all()
    np.testing.assert_allclose(got, unsharded.get(keys)[0], atol=1e-6, rtol=0)
    ids = store.user_ids()
    assert ids["copy7"] == ids["7"] and len(ids) == 1000 + 20
    rejects = [json.loads(line) for line in (store.directory / REJECTS).read_text().splitlines()]
    assert sorted(Path(r["path"]).name for r in rejects) == ["empty.png", "text.png"]


def test_two_shards_merged_equal_one_unsharded_run(
    unsharded: EmbeddingStore, tiny_bundle: Path, tmp_path: Path
) -> None:
    a, b, merged = tmp_path / "a", tmp_path / "b", tmp_path / "merged"
    common = ["--bundle", tiny_bundle, "--images", IMAGES, "--batch-size", BATCH]
    procs = [
        cli("build", *common, "--store", a, "--shard", "0/2"),
        cli("build", *common, "--store", b, "--shard", "1/2"),
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    mid = model_id(tiny_bundle)
    assert [len(EmbeddingStore.open(r, mid, None)) for r in (a, b)] == [500, 500]
    assert main(["merge", "--store", str(merged), str(b), str(a)]) == 0  # order of arguments does not matter
    assert main(["verify", "--store", str(merged)]) == 0
    store = EmbeddingStore.open(merged, mid, None)
    assert store.sha256_at(range(1000)) == unsharded.sha256_at(range(1000))  # same rows, same faiss ids
    assert np.array_equal(store.vectors, unsharded.vectors)
    assert store.user_ids() == unsharded.user_ids()
    query = unsharded.vectors[123]
    assert store.search(query, 5) == unsharded.search(query, 5)


def test_bad_files_are_rejected_not_fatal(tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    for i in range(4):
        shutil.copyfile(IMAGES / f"{i}.png", images / f"{i}.png")
    shutil.copyfile(IMAGES / "2.png", images / "sub" / "again.png")
    (images / "empty.png").write_bytes(b"")
    (images / "truncated.png").write_bytes((IMAGES / "5.png").read_bytes()[:120])
    (images / "notes.jpg").write_text("a text file named like an image")
    (images / "README.txt").write_text("not listed: not an image suffix")
    root = tmp_path / "store"
    args = ["build", "--bundle", str(tiny_bundle), "--images", str(images), "--store", str(root), "--batch-size", "8"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "listed 8 files" in out and "encoded 4 new images" in out and "1 duplicates" in out
    assert "rejected 3" in out
    store = EmbeddingStore.open(root, model_id(tiny_bundle), None)
    assert len(store) == 4 and store.resolve("again") == store.resolve("2")
    rejects = {Path(r["path"]).name: r["reason"] for r in map(json.loads, (store.directory / REJECTS).open())}
    assert set(rejects) == {"empty.png", "truncated.png", "notes.jpg"}
    assert "empty" in rejects["empty.png"] and "not a decodable image" in rejects["notes.jpg"]
    assert main(args) == 0  # a re-run reports them again but does not repeat them in the file
    assert "rejected 3" in capsys.readouterr().out
    assert len((store.directory / REJECTS).read_text().splitlines()) == 3


def test_a_second_concurrent_build_is_refused(
    tiny_bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "store"
    train_images = Path(next(iter(easy_vqa.get_train_image_paths().values()))).parent  # 4,000: a long build
    first = cli("build", "--bundle", tiny_bundle, "--images", train_images, "--store", root, "--batch-size", 1)
    try:
        store = wait_for_rows(root, model_id(tiny_bundle), 1)
        assert store.locked_by() is not None
        with caplog.at_level(logging.ERROR):
            code = main(["build", "--bundle", str(tiny_bundle), "--images", str(IMAGES), "--store", str(root)])
        assert code == 3 and first.poll() is None  # refused while the first build was still running
        assert f"locked for writing by pid {first.pid}" in caplog.text and "dide-cache build" in caplog.text
    finally:
        first.kill()
        first.wait()
    assert store.locked_by() is None


def test_similar_stats_and_verify_failure(
    unsharded: EmbeddingStore, tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = str(unsharded.directory.parent)
    assert main(["similar", "--store", root, "--id", "7", "-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[0].split()[1:] == ["1.0000", unsharded.resolve("7"), "7"]

    from PIL import Image

    flipped = tmp_path / "flipped.png"
    Image.open(IMAGES / "7.png").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(flipped)
    assert main(["similar", "--store", root, "--image", str(flipped), "-k", "2"]) == 1  # not cached, no bundle
    assert main(["similar", "--store", root, "--image", str(flipped), "--bundle", str(tiny_bundle), "-k", "2"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2

    assert main(["stats", "--store", root]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["rows"] == 1000 and stats["dim"] == 32 and stats["index"]["kind"] == "flat"

    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    with open(copy / unsharded.model_id / VECTORS, "r+b") as f:
        f.seek(500 * 32 * 4)
        f.write(b"\x00\x00\x80\x7f")  # +inf into row 500
    assert main(["verify", "--store", str(copy)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "rows 500..524): vector bytes" in out and "infinite" in out


def test_listing_forms_and_stable_shards(tmp_path: Path) -> None:
    for name in ("b.png", "a.jpg", "sub/c.PNG", "skip.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert [it.name for it in list_images(str(tmp_path))] == ["a.jpg", "b.png", "sub/c.PNG"]
    assert [it.path.name for it in list_images(str(tmp_path / "*.png"))] == ["b.png"]
    (tmp_path / "list.txt").write_text("# a comment\nb.png\n\nsub/c.PNG\n")
    assert [it.path for it in list_images(str(tmp_path / "list.txt"))] == [tmp_path / "b.png", tmp_path / "sub/c.PNG"]
    with pytest.raises(ValueError, match="not a directory"):
        list_images(str(tmp_path / "missing"))
    items = [ImageItem(Path(f"{i}.png"), f"{i:04d}.png") for i in range(103)]
    parts = [shard_of(items, k, 4) for k in range(4)]
    assert [it for p in parts for it in p] == items and [len(p) for p in parts] == [25, 26, 26, 26]
    for bad in ("4/4", "1", "a/b", "0/0"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)
