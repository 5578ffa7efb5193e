"""Checking an embedding store: every committed row against the manifest, the commit log and the saved index."""

from __future__ import annotations

from typing import TYPE_CHECKING

import faiss
import numpy as np

from export.store_index import as_idmap, normalized
from export.store_layout import COMMITS, KEYS, USER_IDS, VECTORS, StoreError, json_lines, sha256_hex

if TYPE_CHECKING:
    from export.store import EmbeddingStore


def verify(store: EmbeddingStore) -> tuple[list[str], list[str]]:
    """Check every committed row against the manifest and the commit log: (problems, warnings)."""
    store.refresh()
    m, d, rows = store.manifest, store.directory, len(store)
    problems: list[str] = []
    warnings: list[str] = []
    if m.get("dtype") != "float32" or store.dim <= 0:
        problems.append(f"manifest: unsupported dtype {m.get('dtype')!r} or dim {store.dim}")
    if d.name != store.model_id:
        problems.append(f"manifest: model_id {store.model_id} does not match the directory name {d.name}")
    for name, committed in (
        (VECTORS, rows * store.dim * 4),
        (KEYS, rows * 32),
        (COMMITS, int(m["commits_bytes"])),
        (USER_IDS, int(m["user_ids_bytes"])),
    ):
        size = (d / name).stat().st_size
        if size < committed:
            problems.append(f"{name}: {size} bytes, below the committed {committed}")
        elif size > committed:
            warnings.append(f"{name}: {size - committed} uncommitted bytes past the end (an interrupted writer)")
    if problems:
        return problems, warnings
    # The commit log must tile [0, rows) and every commit's bytes must hash as logged.
    expected_start, uid_off = 0, 0
    with open(d / USER_IDS, "rb") as uf:
        uid_data = uf.read(int(m["user_ids_bytes"]))
    uid_lines = uid_data.splitlines(keepends=True)
    for i, c in enumerate(store.commits()):
        a, n = int(c["start"]), int(c["rows"])
        if a != expected_start:
            problems.append(f"commit {i}: starts at row {a}, expected {expected_start}")
            break
        vec = np.ascontiguousarray(store.vectors[a : a + n]).astype("<f4", copy=False).tobytes()
        if sha256_hex(vec) != c["vectors_sha256"]:
            problems.append(f"commit {i} (rows {a}..{a + n - 1}): vector bytes do not match the logged sha256")
        if sha256_hex(np.ascontiguousarray(store.digests[a : a + n]).tobytes()) != c["keys_sha256"]:
            problems.append(f"commit {i} (rows {a}..{a + n - 1}): key bytes do not match the logged sha256")
        ids = b"".join(uid_lines[uid_off : uid_off + int(c["ids"])])
        if sha256_hex(ids) != c["ids_sha256"]:
            problems.append(f"commit {i}: user-id lines do not match the logged sha256")
        expected_start, uid_off = a + n, uid_off + int(c["ids"])
    if expected_start != rows:
        problems.append(f"commit log covers {expected_start} rows, the manifest says {rows}")
    if uid_off != len(uid_lines):
        problems.append(f"commit log covers {uid_off} user ids, {USER_IDS} holds {len(uid_lines)}")
    keys = np.ascontiguousarray(store.digests).view("S32").ravel()
    uniq, counts = np.unique(keys, return_counts=True)
    if (counts > 1).any():
        dup = [bytes(k).ljust(32, b"\0").hex() for k in uniq[counts > 1][:3]]
        problems.append(f"{int((counts > 1).sum())} sha256 keys appear more than once, e.g. {dup}")
    for a in range(0, rows, 65536):
        if not np.isfinite(store.vectors[a : a + 65536]).all():
            problems.append(f"rows {a}..{min(rows, a + 65536) - 1} hold NaN or infinite values")
    seen: dict[str, str] = {}
    for e in json_lines(d / USER_IDS, b"".join(uid_lines)):
        if e["id"] in seen and seen[e["id"]] != e["sha256"]:
            problems.append(f"user id {e['id']!r} is mapped to two different rows")
        seen[e["id"]] = e["sha256"]
    problems += _verify_index(store, warnings)
    return problems, warnings


def _verify_index(store: EmbeddingStore, warnings: list[str]) -> list[str]:
    saved, rows = store.manifest.get("index"), len(store)
    if not saved:
        warnings.append("no saved faiss index: it is built from the rows when first searched")
        return []
    path = store.directory / saved["file"]
    if not path.is_file():
        return [f"index: {path.name} named by the manifest is missing"]
    data = path.read_bytes()
    if sha256_hex(data) != saved["sha256"]:
        return [f"index: {path.name} does not match its sha256 in the manifest"]
    try:
        index = as_idmap(faiss.deserialize_index(np.frombuffer(data, np.uint8)), path.name)
    except (StoreError, RuntimeError) as e:  # faiss raises RuntimeError on unreadable bytes
        return [f"index: {e}"]
    n = int(saved["rows"])
    if index.ntotal != n or n > rows:
        return [f"index: holds {index.ntotal} vectors, the manifest says {n} of {rows} rows"]
    ids = faiss.vector_to_array(index.id_map)
    if not np.array_equal(ids, np.arange(n)):
        return ["index: faiss ids are not the row numbers 0..N-1 in order"]
    if n and not np.allclose(index.index.reconstruct_n(0, n), normalized(store.vectors[:n]), atol=1e-6):
        return ["index: stored vectors differ from the normalised rows"]
    if n < rows:
        warnings.append(f"index: covers {n} of {rows} rows; the rest are added when it is loaded")
    return []
