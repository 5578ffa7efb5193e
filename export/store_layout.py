"""The embedding store's directory: its file names, its errors, its content key and its append-only files.

Layout of STORE_ROOT/<model_id>/ (every file append-only except those replaced atomically):

    manifest.json    the commit point, replaced atomically (temp file, fsync, rename): rows, dim and
                     the committed byte length of every append-only file below
    vectors.f32      row i = float32 vector (dim,), raw little-endian, memory-mapped
    sha256.bin       row i = the 32-byte content key (sha256 of the image bytes) of row i, memory-mapped
    commits.jsonl    one line per commit: its row range and the sha256 of its vector and key bytes
    user_ids.jsonl   one line per user id: {"id": ..., "sha256": ...}
    index-<N>.faiss  a faiss index over the first N rows, L2-normalised (cosine), faiss id = row number
    write.lock       fcntl.flock write lock; holds the current writer's pid and command for messages
    rejects.jsonl    one line per image a cache build could not use: {"path", "sha256", "reason", "time"}
    shard.json       in a shard's store only: which part of the listing it holds (replaced atomically)

A commit appends to the data files, fsyncs them, then replaces manifest.json. A writer killed at any
moment leaves at most bytes past the committed lengths, which readers never look at and the next
writer truncates, so committed rows are never lost or changed and readers never see half a commit.
Only `export.store.EmbeddingStore` (and the modules it is split into) reads or writes these files.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

FORMAT = 1
MANIFEST = "manifest.json"
VECTORS = "vectors.f32"
KEYS = "sha256.bin"
COMMITS = "commits.jsonl"
USER_IDS = "user_ids.jsonl"
LOCK = "write.lock"
REJECTS = "rejects.jsonl"
SHARD = "shard.json"

_SHA256 = re.compile(r"[0-9a-f]{64}")


class StoreError(RuntimeError):
    """The store is missing, corrupt, or does not match what the caller expects."""


class StoreLocked(StoreError):
    """Another process holds the store's write lock (a `dide-cache build` or `merge` in progress)."""


def content_key(data: bytes) -> str:
    """The store's key for an image: the sha256 of its bytes, lowercase hex."""
    return hashlib.sha256(data).hexdigest()


def is_sha256(key: str) -> bool:
    return bool(_SHA256.fullmatch(key))


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def json_lines(path: Path, data: bytes) -> list[dict]:
    """Parse a committed JSON-lines log; a damaged line is a StoreError naming the file and line."""
    out = []
    for i, line in enumerate(data.splitlines(), 1):
        try:
            out.append(json.loads(line))
        except ValueError:
            raise StoreError(f"{path}:{i}: not a JSON line: the store is damaged") from None
    return out


def append_at(path: Path, offset: int, data: bytes) -> None:
    """Write `data` at `offset` (the committed end of an append-only file) and fsync it."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
