"""The embedding store: content-addressed, append-only, memory-mapped rows with a faiss index, one per model_id.

The one owner of STORE_ROOT/<model_id>/ (layout and commit protocol in `export.store_layout`, the write
lock in `export.store_lock`, the faiss index in `export.store_index`, checking in `export.store_verify`)
and of the content key (`content_key`: the sha256 of the image bytes).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import faiss
import numpy as np

from core.atomic import write_file_atomic
from export import store_verify
from export.store_index import INDEX_KINDS, add_rows, nearest, open_index
from export.store_layout import (
    COMMITS,
    FORMAT,
    KEYS,
    LOCK,
    MANIFEST,
    REJECTS,
    SHARD,
    USER_IDS,
    VECTORS,
    StoreError,
    StoreLocked,
    append_at,
    content_key,
    is_sha256,
    json_lines,
    sha256_hex,
)
from export.store_lock import WriteLock

__all__ = [
    "COMMITS",
    "INDEX_KINDS",
    "KEYS",
    "MANIFEST",
    "REJECTS",
    "USER_IDS",
    "VECTORS",
    "EmbeddingStore",
    "StoreError",
    "StoreLocked",
    "content_key",
    "is_sha256",
]

log = logging.getLogger(__name__)

_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_MAX_USER_ID = 512
# Keys added since the last sort are kept in a dict; past this many, the sorted key array is rebuilt.
_RECENT_MAX = 65536


class EmbeddingStore:
    """One model_id's image embeddings, keyed by the sha256 of the image bytes; see the module docstring."""

    def __init__(self, directory: Path, manifest: dict, lock_timeout: float) -> None:
        self.directory = directory
        self.model_id: str = manifest["model_id"]
        self.dim: int = int(manifest["dim"])
        self._lock = WriteLock(directory / LOCK, lock_timeout)
        self._mutex = threading.RLock()  # guards the in-memory views; writers also hold self._lock
        self._reset(manifest)

    # --- opening and reading ---------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        root: str | Path,
        model_id: str,
        dim: int | None,
        *,
        create: bool = False,
        lock_timeout: float = 2.0,
    ) -> EmbeddingStore:
        """Open ROOT/<model_id>; with create=True make it (dim required) if it does not exist."""
        if not _MODEL_ID.fullmatch(model_id):
            raise ValueError(f"model_id {model_id!r} is not a plain name (letters, digits, '_', '.', '-')")
        directory = Path(root) / model_id
        if not (directory / MANIFEST).is_file():
            if not create:
                raise StoreError(f"no embedding store at {directory}: build one with `dide-cache build`")
            if dim is None or dim <= 0:
                raise ValueError(f"creating a store needs a positive dim, got {dim}")
            cls._create(directory, model_id, dim, lock_timeout)
        manifest = cls._read_manifest(directory)
        if manifest.get("format") != FORMAT:
            raise StoreError(f"{directory / MANIFEST}: unknown store format {manifest.get('format')!r}")
        if manifest.get("model_id") != model_id:
            raise StoreError(f"{directory / MANIFEST} belongs to model {manifest.get('model_id')!r}, not {model_id}")
        if dim is not None and int(manifest["dim"]) != dim:
            raise StoreError(f"the store at {directory} holds {manifest['dim']}-d vectors, the caller has {dim}-d")
        return cls(directory, manifest, lock_timeout)

    @classmethod
    def _create(cls, directory: Path, model_id: str, dim: int, lock_timeout: float) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        with WriteLock(directory / LOCK, lock_timeout).hold("create"):
            if (directory / MANIFEST).is_file():  # another process created it first
                return
            # Data without a manifest is a damaged store, not an empty one: never start over it.
            leftovers = [
                n
                for n in (VECTORS, KEYS, COMMITS, USER_IDS)
                if (directory / n).is_file() and (directory / n).stat().st_size
            ]
            if leftovers:
                raise StoreError(
                    f"{directory / MANIFEST} is missing but {', '.join(leftovers)} hold data: the store is damaged; "
                    "restore manifest.json from a backup or move the directory away to start a new store"
                )
            for name in (VECTORS, KEYS, COMMITS, USER_IDS):
                (directory / name).touch()
            manifest = {
                "format": FORMAT,
                "model_id": model_id,
                "dim": dim,
                "dtype": "float32",
                "rows": 0,
                "commits_bytes": 0,
                "user_ids_bytes": 0,
                "index_kind": "flat",
                "index": None,
                "created": time.time(),
                "updated": time.time(),
            }
            write_file_atomic(directory / MANIFEST, json.dumps(manifest, indent=1).encode())

    @staticmethod
    def _read_manifest(directory: Path) -> dict:
        try:
            return json.loads((directory / MANIFEST).read_text())
        except (OSError, ValueError) as e:
            raise StoreError(f"{directory / MANIFEST} cannot be read: {e}") from None

    def _reset(self, manifest: dict) -> None:
        """(Re)load every in-memory view from a manifest."""
        self.manifest = manifest
        self._rows = 0
        self._vectors = np.empty((0, self.dim), np.float32)
        self._digests = np.empty((0, 32), np.uint8)
        self._sorted_keys = np.empty(0, "S32")
        self._sorted_rows = np.empty(0, np.int64)
        self._recent: dict[bytes, int] = {}
        self._uid_rows: dict[str, int] = {}
        self._uid_bytes = 0
        self._index: faiss.IndexIDMap2 | None = None
        self._apply(manifest)

    def _apply(self, manifest: dict) -> None:
        """Catch the in-memory views up with a newer manifest of the same store (append-only growth)."""
        rows = int(manifest["rows"])
        for name, need in ((VECTORS, rows * self.dim * 4), (KEYS, rows * 32)):
            size = (self.directory / name).stat().st_size
            if size < need:
                raise StoreError(f"{self.directory / name} is truncated: {size} bytes, the manifest needs {need}")
        old = self._rows
        if rows > 0:
            self._vectors = np.memmap(self.directory / VECTORS, dtype="<f4", mode="r", shape=(rows, self.dim))
            self._digests = np.memmap(self.directory / KEYS, dtype=np.uint8, mode="r", shape=(rows, 32))
        self._rows = rows
        self._index_keys(old, rows)
        self._read_user_ids(int(manifest["user_ids_bytes"]))
        if self._index is not None:
            add_rows(self._index, self._vectors, rows)
        self.manifest = manifest

    def _index_keys(self, start: int, end: int) -> None:
        if end - start + len(self._recent) > _RECENT_MAX:
            keys = np.ascontiguousarray(self._digests[:end]).view("S32").ravel()
            order = np.argsort(keys, kind="stable")
            self._sorted_keys, self._sorted_rows = keys[order], order.astype(np.int64)
            self._recent = {}
        else:
            for row in range(start, end):
                self._recent[bytes(self._digests[row])] = row

    def _read_user_ids(self, committed: int) -> None:
        if committed <= self._uid_bytes:
            return
        with open(self.directory / USER_IDS, "rb") as f:
            f.seek(self._uid_bytes)
            data = f.read(committed - self._uid_bytes)
        if len(data) < committed - self._uid_bytes:
            raise StoreError(f"{self.directory / USER_IDS} is truncated below its committed length")
        for entry in json_lines(self.directory / USER_IDS, data):
            row = self._row_of_sha(entry["sha256"])
            if row is None:
                raise StoreError(f"{self.directory / USER_IDS}: id {entry['id']!r} names a missing row")
            self._uid_rows[entry["id"]] = row
        self._uid_bytes = committed

    def refresh(self) -> None:
        """Pick up rows and ids that another process committed since this one last looked."""
        manifest = self._read_manifest(self.directory)
        with self._mutex:
            if manifest.get("created") != self.manifest.get("created") or manifest["rows"] < self._rows:
                self._reset(manifest)  # the store was deleted and rebuilt under us
            elif manifest != self.manifest:
                self._apply(manifest)

    def __len__(self) -> int:
        return self._rows

    @property
    def index_kind(self) -> str:
        return self.manifest.get("index_kind", "flat")

    @property
    def vectors(self) -> np.ndarray:
        """All committed rows, (N, D) float32, read-only and memory-mapped."""
        return self._vectors

    def _row_of_digest(self, digest: bytes) -> int | None:
        row = self._recent.get(digest)
        if row is not None:
            return row
        if len(self._sorted_keys):
            q = np.array([digest], "S32")
            i = int(np.searchsorted(self._sorted_keys, q[0]))
            if i < len(self._sorted_keys) and self._sorted_keys[i] == q[0]:
                return int(self._sorted_rows[i])
        return None

    def _row_of_sha(self, sha: str) -> int | None:
        return self._row_of_digest(bytes.fromhex(sha)) if is_sha256(sha) else None

    def _row_of_key(self, key: str) -> int | None:
        row = self._row_of_sha(key)
        return row if row is not None else self._uid_rows.get(key)

    def sha256_at(self, rows: Iterable[int]) -> list[str]:
        """The content keys of the given row numbers."""
        return [bytes(self._digests[int(r)]).hex() for r in rows]

    def contains(self, sha256: str) -> bool:
        with self._mutex:
            return self._row_of_sha(sha256) is not None

    def resolve(self, key: str) -> str | None:
        """A sha256 or a user id -> the sha256 of the content it names, or None."""
        with self._mutex:
            row = self._row_of_key(key)
            return None if row is None else bytes(self._digests[row]).hex()

    def lookup(self, key: str) -> tuple[str, np.ndarray] | None:
        """One key (a sha256 or a user id) -> (the sha256 of its content, a copy of its vector), or None.

        The per-request path: one row, without get()'s batch arrays or a second search for the sha256."""
        with self._mutex:
            row = self._row_of_key(key)
            if row is None:
                return None
            return bytes(self._digests[row]).hex(), np.array(self._vectors[row], np.float32)

    def get(self, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Vectors for a batch of keys (sha256s or user ids): (N, D) float32, zeros where missing; found (N,)."""
        with self._mutex:
            rows = [self._row_of_key(k) if isinstance(k, str) else None for k in keys]
            found = np.array([r is not None for r in rows], dtype=bool)
            out = np.zeros((len(keys), self.dim), np.float32)
            if found.any():
                out[found] = self._vectors[np.array([r for r in rows if r is not None], np.int64)]
        return out, found

    def rows_of(self, keys: Iterable[str]) -> tuple[np.ndarray, list[str]]:
        """Row numbers (sorted, unique) of the content the keys (sha256s or user ids) name; the keys unknown."""
        with self._mutex:
            found: set[int] = set()
            unknown: list[str] = []
            for key in keys:
                row = self._row_of_key(key)
                if row is None:
                    unknown.append(key)
                else:
                    found.add(row)
        return np.array(sorted(found), np.int64), unknown

    def rows_named(self, prefix: str) -> np.ndarray:
        """Row numbers (sorted, unique) of the content whose user ids start with `prefix`."""
        with self._mutex:
            return np.unique(np.array([r for uid, r in self._uid_rows.items() if uid.startswith(prefix)], np.int64))

    def names_at(self, rows: Iterable[int]) -> list[list[str]]:
        """The user ids naming each row's content (oldest first; [] for none)."""
        with self._mutex:
            wanted: dict[int, list[str]] = {int(r): [] for r in rows}
            for uid, row in self._uid_rows.items():
                if row in wanted:
                    wanted[row].append(uid)
            return [wanted[int(r)] for r in rows]

    def user_ids(self) -> dict[str, str]:
        """Every user id and the sha256 it maps to, in commit order."""
        with self._mutex:
            return {uid: bytes(self._digests[row]).hex() for uid, row in self._uid_rows.items()}

    def commits(self) -> list[dict]:
        with open(self.directory / COMMITS, "rb") as f:
            data = f.read(int(self.manifest["commits_bytes"]))
        return json_lines(self.directory / COMMITS, data)

    @property
    def digests(self) -> np.ndarray:
        """Every committed row's content key as raw bytes, (N, 32) uint8, read-only and memory-mapped."""
        return self._digests

    def disk_bytes(self) -> int:
        """Bytes of every file in the store's directory."""
        return sum(p.stat().st_size for p in self.directory.iterdir() if p.is_file())

    # --- the cache build's notes: images it could not use, and which shard of a listing this store holds ------

    @property
    def rejects_file(self) -> Path:
        return self.directory / REJECTS

    def rejects(self) -> list[dict]:
        """Images a cache build could not use, oldest first: {"path", "sha256", "reason", "time"} each."""
        path = self.rejects_file
        return json_lines(path, path.read_bytes()) if path.is_file() else []

    def add_rejects(self, entries: list[dict]) -> None:
        """Append entries to the rejects log, leaving out any it already holds word for word."""
        with self._lock.hold("add_rejects"):
            known = {json.dumps(e) for e in self.rejects()}
            lines = [line for line in (json.dumps(e) for e in entries) if line not in known]
            if lines:
                with open(self.rejects_file, "a") as f:
                    f.writelines(line + "\n" for line in dict.fromkeys(lines))

    def shard(self) -> dict | None:
        """Which part of a listing a sharded build wrote here ({"shard", "of", ...}), or None."""
        path = self.directory / SHARD
        return json.loads(path.read_text()) if path.is_file() else None

    def set_shard(self, info: dict) -> None:
        with self._lock.hold("set_shard"):
            write_file_atomic(self.directory / SHARD, json.dumps(info).encode())

    # --- writing -----------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def writer(self, what: str = "writer") -> Iterator[EmbeddingStore]:
        """Hold the write lock for a whole run (a build or merge); other writers get StoreLocked."""
        with self._lock.hold(what):
            self._recover()
            yield self

    def locked_by(self) -> str | None:
        """Who holds the write lock, or None when nobody does."""
        return self._lock.holder_elsewhere()

    def _recover(self) -> None:
        """Under the lock: reload, then drop what a killed writer left past the committed lengths."""
        self.refresh()
        m = self.manifest
        for name, committed in (
            (VECTORS, self._rows * self.dim * 4),
            (KEYS, self._rows * 32),
            (COMMITS, int(m["commits_bytes"])),
            (USER_IDS, int(m["user_ids_bytes"])),
        ):
            path = self.directory / name
            if path.stat().st_size > committed:
                log.warning(
                    "%s: dropping %d uncommitted bytes left by an interrupted writer",
                    path,
                    path.stat().st_size - committed,
                )
                os.truncate(path, committed)
        keep = (m.get("index") or {}).get("file")
        for path in self.directory.iterdir():
            stale_index = path.name.startswith("index-") and path.name.endswith(".faiss") and path.name != keep
            if stale_index or (path.name.startswith(".") and path.name.endswith(".tmp")):
                path.unlink(missing_ok=True)

    def add(self, sha256s: list[str], vectors: np.ndarray, user_ids: list[str | None] | None = None) -> int:
        """Append rows for content not yet present (and their user ids) as one atomic commit; rows added.

        Raises ValueError on malformed input or when a user id already names different content, and
        StoreLocked when another process holds the write lock for longer than lock_timeout.
        """
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape != (len(sha256s), self.dim):
            raise ValueError(f"vectors must have shape ({len(sha256s)}, {self.dim}), got {vectors.shape}")
        if vectors.dtype != np.float32:
            raise ValueError(f"vectors must be float32 (as the bundle computes them), got {vectors.dtype}")
        if not np.isfinite(vectors).all():
            raise ValueError("vectors contain NaN or infinite values")
        if user_ids is not None and len(user_ids) != len(sha256s):
            raise ValueError(f"{len(user_ids)} user ids for {len(sha256s)} rows")
        for s in sha256s:
            if not isinstance(s, str) or not is_sha256(s):
                raise ValueError(f"{s!r} is not a lowercase hex sha256")
        with self._lock.hold("add"), self._mutex:
            self._recover()
            new: dict[str, int] = {}
            for i, s in enumerate(sha256s):
                if s not in new and self._row_of_sha(s) is None:
                    new[s] = i
            pairs = self._id_pairs(
                [(u, s) for u, s in zip(user_ids or [], sha256s, strict=False) if u is not None], set(new)
            )
            take = list(new.values())
            digests = np.frombuffer(b"".join(bytes.fromhex(sha256s[i]) for i in take), np.uint8).reshape(-1, 32)
            self._commit(digests, np.ascontiguousarray(vectors[take]), pairs)
            return len(take)

    def add_ids(self, pairs: list[tuple[str, str]]) -> int:
        """Map user ids to content already in the store, as one commit; ids newly mapped."""
        with self._lock.hold("add_ids"), self._mutex:
            self._recover()
            for _, s in pairs:
                if self._row_of_sha(s) is None:
                    raise ValueError(f"cannot map a user id to {s}: no such row in the store")
            new_pairs = self._id_pairs(pairs, set())
            self._commit(np.empty((0, 32), np.uint8), np.empty((0, self.dim), np.float32), new_pairs)
            return len(new_pairs)

    def _id_pairs(self, pairs: list[tuple[str, str]], pending: set[str]) -> list[tuple[str, str]]:
        """The (user id, sha256) pairs not yet mapped; ValueError when an id would be remapped."""
        out: dict[str, str] = {}
        for uid, sha in pairs:
            if not isinstance(uid, str) or not uid or len(uid) > _MAX_USER_ID:
                raise ValueError(f"user id {uid!r} must be a non-empty string of at most {_MAX_USER_ID} characters")
            row = self._uid_rows.get(uid)
            have = out.get(uid) or (bytes(self._digests[row]).hex() if row is not None else None)
            if have is not None and have != sha:
                raise ValueError(f"user id {uid!r} already names other content (sha256 {have}); ids are permanent")
            if have is None:
                if sha not in pending and self._row_of_sha(sha) is None:
                    raise ValueError(f"cannot map user id {uid!r} to {sha}: no such row")
                out[uid] = sha
        return list(out.items())

    def _commit(self, digests: np.ndarray, vectors: np.ndarray, pairs: list[tuple[str, str]]) -> None:
        """Append rows and id lines, fsync, then replace the manifest (the commit point)."""
        n = len(digests)
        if n == 0 and not pairs:
            return
        m = dict(self.manifest)
        start = self._rows
        vec_bytes = vectors.astype("<f4", copy=False).tobytes()
        key_bytes = digests.tobytes()
        uid_bytes = b"".join(json.dumps({"id": u, "sha256": s}).encode() + b"\n" for u, s in pairs)
        commit = {
            "start": start,
            "rows": n,
            "ids": len(pairs),
            "vectors_sha256": sha256_hex(vec_bytes),
            "keys_sha256": sha256_hex(key_bytes),
            "ids_sha256": sha256_hex(uid_bytes),
            "time": round(time.time(), 3),
        }
        commit_bytes = json.dumps(commit).encode() + b"\n"
        if n:
            append_at(self.directory / VECTORS, start * self.dim * 4, vec_bytes)
            append_at(self.directory / KEYS, start * 32, key_bytes)
        if pairs:
            append_at(self.directory / USER_IDS, int(m["user_ids_bytes"]), uid_bytes)
        append_at(self.directory / COMMITS, int(m["commits_bytes"]), commit_bytes)
        m.update(
            rows=start + n,
            commits_bytes=int(m["commits_bytes"]) + len(commit_bytes),
            user_ids_bytes=int(m["user_ids_bytes"]) + len(uid_bytes),
            updated=time.time(),
        )
        write_file_atomic(self.directory / MANIFEST, json.dumps(m, indent=1).encode())
        self._apply(m)

    # --- nearest neighbours ------------------------------------------------------------------------------

    def _ensure_index(self) -> faiss.IndexIDMap2:
        """The in-memory index over every row: the saved one (if any) topped up, or built from the rows."""
        if self._index is None:
            saved = self.manifest.get("index")
            path = self.directory / saved["file"] if saved else None
            path = path if path is not None and path.is_file() else None
            self._index = open_index(path, self.index_kind, self.dim, self._vectors[: self._rows])
        return self._index

    def search(self, vector: np.ndarray, k: int) -> list[tuple[str, float]]:
        """The k rows most similar to `vector` by cosine similarity, best first, as (sha256, score)."""
        vector = np.asarray(vector, np.float32).reshape(1, -1)
        if vector.shape[1] != self.dim:
            raise ValueError(f"the query has {vector.shape[1]} dims, the store {self.dim}")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        with self._mutex:
            return [(bytes(self._digests[row]).hex(), score) for row, score in nearest(self._ensure_index(), vector, k)]

    def save_index(self, kind: str | None = None) -> Path:
        """Write the faiss index over every row (of `kind`, default the store's) atomically; its path."""
        kind = kind or self.index_kind
        if kind not in INDEX_KINDS:
            raise ValueError(f"unknown index kind {kind!r}: choose one of {', '.join(INDEX_KINDS)}")
        with self._lock.hold("save_index"), self._mutex:
            self._recover()
            if kind != self.index_kind:
                self._index = None
                self.manifest = {**self.manifest, "index_kind": kind, "index": None}
            index = self._ensure_index()
            name = f"index-{self._rows}.faiss"
            data = faiss.serialize_index(index).tobytes()
            write_file_atomic(self.directory / name, data)
            m = dict(self.manifest)
            old = (m.get("index") or {}).get("file")
            m.update(
                index_kind=kind,
                index={"kind": kind, "file": name, "rows": self._rows, "sha256": sha256_hex(data)},
                updated=time.time(),
            )
            write_file_atomic(self.directory / MANIFEST, json.dumps(m, indent=1).encode())
            self.manifest = m
            if old and old != name:
                (self.directory / old).unlink(missing_ok=True)
            return self.directory / name

    # --- checking ------------------------------------------------------------------------------------------

    def verify(self) -> tuple[list[str], list[str]]:
        """Check every committed row against the manifest and the commit log: (problems, warnings)."""
        return store_verify.verify(self)
