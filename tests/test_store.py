"""The embedding store: lookups, ids, append-only commits, crash recovery, the write lock, faiss indexes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from export.store import COMMITS, KEYS, MANIFEST, USER_IDS, VECTORS, EmbeddingStore, StoreError, StoreLocked

DIM = 8


def sha(i: int) -> str:
    return hashlib.sha256(f"image {i}".encode()).hexdigest()


def vec(i: int) -> np.ndarray:
    return np.random.default_rng(i).standard_normal(DIM).astype(np.float32)


def rows(a: int, b: int) -> tuple[list[str], np.ndarray]:
    return [sha(i) for i in range(a, b)], np.stack([vec(i) for i in range(a, b)])


@pytest.fixture
def store(tmp_path: Path) -> EmbeddingStore:
    return EmbeddingStore.open(tmp_path / "root", "model0", DIM, create=True)


def test_add_get_resolve_and_batch_lookup(store: EmbeddingStore) -> None:
    keys, vectors = rows(0, 10)
    assert store.add(keys, vectors, [f"img{i}" for i in range(10)]) == 10
    # Present rows are skipped, duplicates inside one call are added once.
    more_keys, more = rows(5, 15)
    assert store.add([*more_keys, sha(14)], np.concatenate([more, vec(14)[None]]), None) == 5
    assert len(store) == 15
    assert store.resolve("img3") == sha(3) and store.resolve(sha(12)) == sha(12)
    assert store.resolve("nope") is None and store.resolve(sha(99)) is None

    got, found = store.get(["img1", sha(14), "missing", sha(99), sha(0)])
    assert found.tolist() == [True, True, False, False, True]
    assert np.array_equal(got[0], vec(1)) and np.array_equal(got[1], vec(14)) and np.array_equal(got[4], vec(0))
    assert not got[2].any() and not got[3].any()
    assert got.dtype == np.float32 and got.shape == (5, DIM)

    # One key at a time (the service's path): the content's sha256 and a copy of its vector.
    for key, i in (("img3", 3), (sha(12), 12)):
        hit = store.lookup(key)
        assert hit is not None and hit[0] == sha(i) and np.array_equal(hit[1], vec(i)) and hit[1].dtype == np.float32
        hit[1][:] = 0
    assert np.array_equal(store.lookup("img3")[1], vec(3))  # type: ignore[index]
    assert store.lookup("missing") is None and store.lookup(sha(99)) is None


def test_user_ids_are_permanent_and_validated(store: EmbeddingStore) -> None:
    keys, vectors = rows(0, 3)
    store.add(keys, vectors, ["a", "b", None])
    with pytest.raises(ValueError, match="'a' already names other content"):
        store.add([sha(7)], vec(7)[None], ["a"])
    assert len(store) == 3  # nothing of the refused call was committed
    assert store.add_ids([("c", sha(2)), ("a", sha(0))]) == 1  # re-mapping to the same content is a no-op
    assert store.user_ids() == {"a": sha(0), "b": sha(1), "c": sha(2)}
    with pytest.raises(ValueError, match="no such row"):
        store.add_ids([("d", sha(50))])
    with pytest.raises(ValueError, match="float32"):
        store.add([sha(5)], vec(5)[None].astype(np.float64))
    with pytest.raises(ValueError, match="NaN"):
        store.add([sha(5)], np.full((1, DIM), np.nan, np.float32))
    with pytest.raises(ValueError, match="sha256"):
        store.add(["not-a-hash"], vec(5)[None])


def test_rows_are_memory_mapped_and_other_processes_see_commits(store: EmbeddingStore, tmp_path: Path) -> None:
    keys, vectors = rows(0, 4)
    store.add(keys, vectors)
    reader = EmbeddingStore.open(tmp_path / "root", "model0", DIM)
    assert isinstance(reader.vectors, np.memmap) and len(reader) == 4
    keys, vectors = rows(4, 9)
    store.add(keys, vectors, [f"u{i}" for i in range(4, 9)])
    assert len(reader) == 4  # until it refreshes
    reader.refresh()
    assert len(reader) == 9 and reader.resolve("u8") == sha(8)
    assert np.array_equal(reader.get([sha(6)])[0][0], vec(6))
    with pytest.raises(StoreError, match="holds 8-d vectors"):
        EmbeddingStore.open(tmp_path / "root", "model0", 16)
    with pytest.raises(StoreError, match="no embedding store"):
        EmbeddingStore.open(tmp_path / "root", "other", DIM)


def test_search_ranks_by_cosine(store: EmbeddingStore) -> None:
    keys, vectors = rows(0, 50)
    store.add(keys, vectors)
    hits = store.search(vectors[7] * 3.0, 5)  # scale does not matter: cosine similarity
    assert hits[0][0] == sha(7) and hits[0][1] == pytest.approx(1.0, abs=1e-5)
    assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)
    assert len(store.search(vectors[0], 500)) == 50


def test_killed_writer_leftovers_are_invisible_and_dropped(store: EmbeddingStore, tmp_path: Path) -> None:
    keys, vectors = rows(0, 6)
    store.add(keys, vectors, [f"u{i}" for i in range(6)])
    d = store.directory
    # What a writer killed after appending but before replacing the manifest leaves behind.
    for name, junk in ((VECTORS, b"\x01" * 3 * DIM * 4), (KEYS, b"\x02" * 70), (COMMITS, b'{"start": 6'),
                       (USER_IDS, b'{"id": "u9", "sha')):  # fmt: skip
        with open(d / name, "ab") as f:
            f.write(junk)
    (d / f".{MANIFEST}.12345.tmp").write_text('{"rows": 9')
    reader = EmbeddingStore.open(tmp_path / "root", "model0", DIM)
    assert len(reader) == 6 and reader.resolve("u9") is None
    problems, warnings = reader.verify()
    assert problems == [] and len([w for w in warnings if "uncommitted" in w]) == 4

    keys, vectors = rows(6, 8)
    assert reader.add(keys, vectors, ["u6", "u7"]) == 2  # the next writer truncates the junk first
    problems, warnings = EmbeddingStore.open(tmp_path / "root", "model0", DIM).verify()
    assert problems == [] and not [w for w in warnings if "uncommitted" in w]
    assert not list(d.glob(".*.tmp"))
    assert np.array_equal(reader.get([sha(7)])[0][0], vec(7)) and len(reader) == 8


def test_verify_finds_corruption(store: EmbeddingStore, tmp_path: Path) -> None:
    for a in range(0, 30, 10):
        keys, vectors = rows(a, a + 10)
        store.add(keys, vectors)
    store.save_index()
    assert store.verify()[0] == []
    with open(store.directory / VECTORS, "r+b") as f:  # flip one byte of row 15
        f.seek(15 * DIM * 4 + 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))
    problems, _ = store.verify()
    assert any("commit 1 (rows 10..19): vector bytes" in p for p in problems), problems
    index = store.directory / store.manifest["index"]["file"]
    index.write_bytes(index.read_bytes()[:-10])
    assert any("does not match its sha256" in p for p in store.verify()[0])
    os.truncate(store.directory / KEYS, 20 * 32)
    with pytest.raises(StoreError, match="truncated"):
        EmbeddingStore.open(tmp_path / "root", "model0", DIM)


HOLD_LOCK = """
import sys, time
from export.store import EmbeddingStore
store = EmbeddingStore.open(sys.argv[1], "model0", 8)
with store.writer("dide-cache build (test)"):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_write_lock_refuses_a_second_writer(store: EmbeddingStore, tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path / "root")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        other = EmbeddingStore.open(tmp_path / "root", "model0", DIM, lock_timeout=0.2)
        with pytest.raises(StoreLocked, match=rf"locked for writing by pid {holder.pid} .*dide-cache build \(test\)"):
            other.add([sha(0)], vec(0)[None])
        assert f"pid {holder.pid}" in other.locked_by()
        assert len(other) == 0
    finally:
        holder.kill()
        holder.wait()
    assert store.locked_by() is None
    assert store.add([sha(0)], vec(0)[None]) == 1  # a killed holder's lock is released by the kernel


WRITER = """
import hashlib, sys
import numpy as np
from export.store import EmbeddingStore
store = EmbeddingStore.open(sys.argv[1], "model0", 8, create=True)
for a in range(0, 100000, 8):
    keys = [hashlib.sha256(f"image {i}".encode()).hexdigest() for i in range(a, a + 8)]
    vectors = np.stack([np.random.default_rng(i).standard_normal(8).astype(np.float32) for i in range(a, a + 8)])
    store.add(keys, vectors, [f"u{i}" for i in range(a, a + 8)])
    print(a + 8, flush=True)
"""


def test_kill_9_mid_write_loses_at_most_the_batch_in_flight(tmp_path: Path) -> None:
    root = tmp_path / "root"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(root)], stdout=subprocess.PIPE, text=True)
    try:
        assert int(writer.stdout.readline()) == 8
        reader = EmbeddingStore.open(root, "model0", DIM)
        deadline = time.monotonic() + 20
        while len(reader) < 200 and time.monotonic() < deadline:
            reader.refresh()
            assert len(reader) % 8 == 0  # readers never see half a commit
        writer.send_signal(signal.SIGKILL)
    finally:
        writer.kill()
        writer.wait()
    assert len(reader) >= 200
    store = EmbeddingStore.open(root, "model0", DIM)
    n = len(store)
    assert n % 8 == 0
    assert store.verify()[0] == []
    got, found = store.get([sha(i) for i in range(n)])
    assert found.all() and np.array_equal(got, np.stack([vec(i) for i in range(n)]))
    assert store.user_ids() == {f"u{i}": sha(i) for i in range(n)}
    keys, vectors = rows(0, n + 8)  # resuming adds only what is missing
    assert store.add(keys, vectors) == 8 and store.verify()[0] == []


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_saved_index_kinds(tmp_path: Path, kind: str) -> None:
    store = EmbeddingStore.open(tmp_path, "model0", DIM, create=True)
    n = 25_000 if kind == "ivf" else 2_000  # ivf trains ~4*sqrt(N) lists and wants 39 points per list
    keys = [sha(i) for i in range(n)]
    vectors = np.random.default_rng(0).standard_normal((n, DIM)).astype(np.float32)
    store.add(keys, vectors)
    if kind == "ivf":
        small = EmbeddingStore.open(tmp_path / "small", "m", DIM, create=True)
        small.add(keys[:100], vectors[:100])
        with pytest.raises(ValueError, match="ivf index needs"):
            small.save_index("ivf")
    path = store.save_index(kind)
    assert path.name == f"index-{n}.faiss"
    assert store.verify()[0] == []
    reopened = EmbeddingStore.open(tmp_path, "model0", DIM)
    assert reopened.index_kind == kind
    hits = reopened.search(vectors[123], 3)
    assert hits[0][0] == keys[123]
    # Rows added after the index was saved are searchable at once and show up as not yet saved.
    new = np.random.default_rng(1).standard_normal((1, DIM)).astype(np.float32)
    reopened.add([sha(n)], new)
    assert reopened.search(new[0], 1)[0][0] == sha(n)
    problems, warnings = reopened.verify()
    assert problems == [] and any(f"covers {n} of {n + 1} rows" in w for w in warnings)


def test_manifest_is_the_commit_point(store: EmbeddingStore) -> None:
    keys, vectors = rows(0, 4)
    store.add(keys, vectors, ["x", None, None, None])
    m = json.loads((store.directory / MANIFEST).read_text())
    assert m["rows"] == 4 and m["dim"] == DIM and m["model_id"] == "model0"
    assert (store.directory / VECTORS).stat().st_size == 4 * DIM * 4
    assert m["commits_bytes"] == (store.directory / COMMITS).stat().st_size
    (commit,) = store.commits()
    assert commit["start"] == 0 and commit["rows"] == 4 and commit["ids"] == 1
    with pytest.raises(ValueError, match="plain name"):
        EmbeddingStore.open(store.directory.parent, "../escape", DIM, create=True)
