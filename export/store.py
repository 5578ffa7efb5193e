"""The embedding store: content-addressed, append-only, memory-mapped rows with a faiss index, one per model_id.

Layout of STORE_ROOT/<model_id>/ (every file append-only except the two replaced atomically):

    manifest.json    the commit point, replaced atomically (temp file, fsync, rename): rows, dim and
                     the committed byte length of every append-only file below
    vectors.f32      row i = float32 vector (dim,), raw little-endian, memory-mapped
    sha256.bin       row i = the 32-byte sha256 of the image bytes of row i, memory-mapped
    commits.jsonl    one line per commit: its row range and the sha256 of its vector and key bytes
    user_ids.jsonl   one line per user id: {"id": ..., "sha256": ...}
    index-<N>.faiss  a faiss index over the first N rows, L2-normalised (cosine), faiss id = row number
    write.lock       fcntl.flock write lock; holds the current writer's pid and command for messages

A commit appends to the data files, fsyncs them, then replaces manifest.json. A writer killed at any
moment leaves at most bytes past the committed lengths, which readers never look at and the next
writer truncates, so committed rows are never lost or changed and readers never see half a commit.

Index kinds (`index_kind`): "flat" (IndexIDMap2 over IndexFlatIP, exact, the default), "hnsw"
(IndexHNSWFlat, M=32: approximate, no training, a good choice up to ~10^8 rows in RAM) and "ivf"
(IndexIVFFlat with ~4*sqrt(N) lists, trained at save time, probed with nprobe=16: for 10^7+ rows when
memory per query matters). All three are wrapped in IndexIDMap2 so faiss ids are row numbers.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import faiss
import numpy as np

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"


def _json_lines(path: Path, data: bytes) -> list[dict]:
    """Parse a committed JSON-lines log; a damaged line is a StoreError naming the file and line."""
    out = []
    for i, line in enumerate(data.splitlines(), 1):
        try:
            out.append(json.loads(line))
        except ValueError:
            raise StoreError(f"{path}:{i}: not a JSON line: the store is damaged") from None
    return out


VECTORS = "vectors.f32"
KEYS = "sha256.bin"
COMMITS = "commits.jsonl"
USER_IDS = "user_ids.jsonl"
LOCK = "write.lock"
INDEX_KINDS = ("flat", "hnsw", "ivf")

_SHA256 = re.compile(r"[0-9a-f]{64}")
_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_MAX_USER_ID = 512
# Keys added since the last sort are kept in a dict; past this many, the sorted key array is rebuilt.
_RECENT_MAX = 65536
_HNSW_M = 32
_HNSW_EF_SEARCH = 64
_IVF_NPROBE = 16


class StoreError(RuntimeError):
    """The store is missing, corrupt, or does not match what the caller expects."""


class StoreLocked(StoreError):
    """Another process holds the store's write lock (a `dide-cache build` or `merge` in progress)."""


def is_sha256(key: str) -> bool:
    return bool(_SHA256.fullmatch(key))


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_file_atomic(path: Path, data: bytes) -> None:
    """Write `path` so that it holds either its old content or `data`, never a mix: temp, fsync, rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a directory's entries (created, renamed files) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _append(path: Path, offset: int, data: bytes) -> None:
    """Write `data` at `offset` (the committed end of an append-only file) and fsync it."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _normalized(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), as a new C-contiguous float32 array."""
    x = np.array(x, dtype=np.float32, copy=True, order="C")
    with np.errstate(invalid="ignore", over="ignore"):  # only a corrupt row (checked by verify) is not finite
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        np.divide(x, norms, out=x, where=norms > 0)
    return x


def _new_index(kind: str, dim: int, train: np.ndarray) -> faiss.IndexIDMap2:
    """An empty IndexIDMap2 of `kind` (inner product over normalised rows); IVF is trained on `train`."""
    inner: faiss.Index
    if kind == "flat":
        inner = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        inner = faiss.IndexHNSWFlat(dim, _HNSW_M, faiss.METRIC_INNER_PRODUCT)
    elif kind == "ivf":
        nlist = max(1, int(4 * math.sqrt(len(train))))
        if len(train) < 39 * nlist or len(train) < 1000:
            raise ValueError(
                f"an ivf index needs at least max(1000, 39 x nlist) rows to train, the store has "
                f"{len(train)}: use --index flat or hnsw until it grows"
            )
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = np.sort(np.random.default_rng(0).permutation(len(train))[: 256 * nlist])
        ivf.train(_normalized(train[sample]))
        ivf.make_direct_map()  # so verify can reconstruct rows by id
        inner = ivf
    else:
        raise ValueError(f"unknown index kind {kind!r}: choose one of {', '.join(INDEX_KINDS)}")
    return _tune(faiss.IndexIDMap2(inner))


def _as_idmap(index: faiss.Index, what: str) -> faiss.IndexIDMap2:
    # faiss's Python layer already returns read indexes as their concrete class; downcast_index here
    # would make a second, non-owning proxy and let the owning one free the index.
    if not isinstance(index, faiss.IndexIDMap2):
        raise StoreError(f"{what} is a {type(index).__name__}, not the IndexIDMap2 this store writes")
    return index


def _tune(index: faiss.IndexIDMap2) -> faiss.IndexIDMap2:
    """Set the search-time knobs, which a saved index may not carry."""
    inner = faiss.downcast_index(index.index)
    if isinstance(inner, faiss.IndexHNSWFlat):
        inner.hnsw.efSearch = _HNSW_EF_SEARCH
    elif isinstance(inner, faiss.IndexIVFFlat):
        inner.nprobe = _IVF_NPROBE
    return index


class _WriteLock:
    """An fcntl.flock on DIR/write.lock: re-entrant within one object, threads of it queue up."""

    def __init__(self, path: Path, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self._threads = threading.RLock()
        self._fd: int | None = None

    def _holder(self) -> str:
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            info = {}
        if not info:
            return "another process"
        return f"pid {info.get('pid')} on {info.get('host')} ({info.get('what')}, since {info.get('since')})"

    @contextlib.contextmanager
    def hold(self, what: str) -> Iterator[None]:
        """Hold the lock; wait up to `timeout` seconds for another holder, then raise StoreLocked."""
        with self._threads:
            if self._fd is not None:  # re-entered by the thread that holds it
                yield
                return
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            deadline = time.monotonic() + self.timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        os.close(fd)
                        raise StoreLocked(
                            f"the embedding store {self.path.parent} is locked for writing by {self._holder()}: "
                            "wait for that build or merge to finish (or stop it) and run this again"
                        ) from None
                    time.sleep(0.05)
            holder = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "what": what,
                "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder).encode(), 0)
            self._fd = fd
            try:
                yield
            finally:
                self._fd = None
                os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)

    def holder_elsewhere(self) -> str | None:
        """Who else holds the lock, or None."""
        if self._fd is not None:
            return None
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        except BlockingIOError:
            return self._holder()
        finally:
            os.close(fd)


class EmbeddingStore:
    """One model_id's image embeddings, keyed by the sha256 of the image bytes; see the module docstring."""

    def __init__(self, directory: Path, manifest: dict, lock_timeout: float) -> None:
        self.directory = directory
        self.model_id: str = manifest["model_id"]
        self.dim: int = int(manifest["dim"])
        self._lock = _WriteLock(directory / LOCK, lock_timeout)
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
        with _WriteLock(directory / LOCK, lock_timeout).hold("create"):
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
        if self._index is not None and self._index.ntotal < rows:
            self._index_add(self._index, self._index.ntotal, rows)
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
        for entry in _json_lines(self.directory / USER_IDS, data):
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

    def get(self, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Vectors for a batch of keys (sha256s or user ids): (N, D) float32, zeros where missing; found (N,)."""
        with self._mutex:
            rows = [self._row_of_key(k) if isinstance(k, str) else None for k in keys]
            found = np.array([r is not None for r in rows], dtype=bool)
            out = np.zeros((len(keys), self.dim), np.float32)
            if found.any():
                out[found] = self._vectors[np.array([r for r in rows if r is not None], np.int64)]
        return out, found

    def user_ids(self) -> dict[str, str]:
        """Every user id and the sha256 it maps to, in commit order."""
        with self._mutex:
            return {uid: bytes(self._digests[row]).hex() for uid, row in self._uid_rows.items()}

    def commits(self) -> list[dict]:
        with open(self.directory / COMMITS, "rb") as f:
            data = f.read(int(self.manifest["commits_bytes"]))
        return _json_lines(self.directory / COMMITS, data)

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
            _append(self.directory / VECTORS, start * self.dim * 4, vec_bytes)
            _append(self.directory / KEYS, start * 32, key_bytes)
        if pairs:
            _append(self.directory / USER_IDS, int(m["user_ids_bytes"]), uid_bytes)
        _append(self.directory / COMMITS, int(m["commits_bytes"]), commit_bytes)
        m.update(
            rows=start + n,
            commits_bytes=int(m["commits_bytes"]) + len(commit_bytes),
            user_ids_bytes=int(m["user_ids_bytes"]) + len(uid_bytes),
            updated=time.time(),
        )
        write_file_atomic(self.directory / MANIFEST, json.dumps(m, indent=1).encode())
        self._apply(m)

    # --- nearest neighbours ------------------------------------------------------------------------------

    def _index_add(self, index: faiss.IndexIDMap2, start: int, end: int, chunk: int = 65536) -> None:
        for a in range(start, end, chunk):
            b = min(end, a + chunk)
            index.add_with_ids(_normalized(self._vectors[a:b]), np.arange(a, b, dtype=np.int64))

    def _ensure_index(self) -> faiss.IndexIDMap2:
        """The in-memory index over every row: the saved one (if any) topped up, or built from the rows."""
        if self._index is None:
            saved = self.manifest.get("index")
            if saved and (self.directory / saved["file"]).is_file():
                path = self.directory / saved["file"]
                index = _tune(_as_idmap(faiss.read_index(str(path)), str(path)))
            else:
                index = _new_index(self.index_kind, self.dim, self._vectors)
            self._index_add(index, index.ntotal, self._rows)
            self._index = index
        return self._index

    def search(self, vector: np.ndarray, k: int) -> list[tuple[str, float]]:
        """The k rows most similar to `vector` by cosine similarity, best first, as (sha256, score)."""
        vector = np.asarray(vector, np.float32).reshape(1, -1)
        if vector.shape[1] != self.dim:
            raise ValueError(f"the query has {vector.shape[1]} dims, the store {self.dim}")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        with self._mutex:
            index = self._ensure_index()
            if index.ntotal == 0:
                return []
            scores, ids = index.search(_normalized(vector), min(k, index.ntotal))
            return [(bytes(self._digests[i]).hex(), float(s)) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0]

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
        self.refresh()
        m, d = self.manifest, self.directory
        problems: list[str] = []
        warnings: list[str] = []
        if m.get("dtype") != "float32" or self.dim <= 0:
            problems.append(f"manifest: unsupported dtype {m.get('dtype')!r} or dim {self.dim}")
        if d.name != self.model_id:
            problems.append(f"manifest: model_id {self.model_id} does not match the directory name {d.name}")
        for name, committed in (
            (VECTORS, self._rows * self.dim * 4),
            (KEYS, self._rows * 32),
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
        for i, c in enumerate(self.commits()):
            a, n = int(c["start"]), int(c["rows"])
            if a != expected_start:
                problems.append(f"commit {i}: starts at row {a}, expected {expected_start}")
                break
            vec = np.ascontiguousarray(self._vectors[a : a + n]).astype("<f4", copy=False).tobytes()
            if sha256_hex(vec) != c["vectors_sha256"]:
                problems.append(f"commit {i} (rows {a}..{a + n - 1}): vector bytes do not match the logged sha256")
            if sha256_hex(np.ascontiguousarray(self._digests[a : a + n]).tobytes()) != c["keys_sha256"]:
                problems.append(f"commit {i} (rows {a}..{a + n - 1}): key bytes do not match the logged sha256")
            ids = b"".join(uid_lines[uid_off : uid_off + int(c["ids"])])
            if sha256_hex(ids) != c["ids_sha256"]:
                problems.append(f"commit {i}: user-id lines do not match the logged sha256")
            expected_start, uid_off = a + n, uid_off + int(c["ids"])
        if expected_start != self._rows:
            problems.append(f"commit log covers {expected_start} rows, the manifest says {self._rows}")
        if uid_off != len(uid_lines):
            problems.append(f"commit log covers {uid_off} user ids, {USER_IDS} holds {len(uid_lines)}")
        keys = np.ascontiguousarray(self._digests).view("S32").ravel()
        uniq, counts = np.unique(keys, return_counts=True)
        if (counts > 1).any():
            dup = [bytes(k).ljust(32, b"\0").hex() for k in uniq[counts > 1][:3]]
            problems.append(f"{int((counts > 1).sum())} sha256 keys appear more than once, e.g. {dup}")
        for a in range(0, self._rows, 65536):
            if not np.isfinite(self._vectors[a : a + 65536]).all():
                problems.append(f"rows {a}..{min(self._rows, a + 65536) - 1} hold NaN or infinite values")
        seen: dict[str, str] = {}
        for e in _json_lines(self.directory / USER_IDS, b"".join(uid_lines)):
            if e["id"] in seen and seen[e["id"]] != e["sha256"]:
                problems.append(f"user id {e['id']!r} is mapped to two different rows")
            seen[e["id"]] = e["sha256"]
        problems += self._verify_index(warnings)
        return problems, warnings

    def _verify_index(self, warnings: list[str]) -> list[str]:
        saved = self.manifest.get("index")
        if not saved:
            warnings.append("no saved faiss index: it is built from the rows when first searched")
            return []
        path = self.directory / saved["file"]
        if not path.is_file():
            return [f"index: {path.name} named by the manifest is missing"]
        data = path.read_bytes()
        if sha256_hex(data) != saved["sha256"]:
            return [f"index: {path.name} does not match its sha256 in the manifest"]
        try:
            index = _as_idmap(faiss.deserialize_index(np.frombuffer(data, np.uint8)), path.name)
        except (StoreError, RuntimeError) as e:  # faiss raises RuntimeError on unreadable bytes
            return [f"index: {e}"]
        n = int(saved["rows"])
        if index.ntotal != n or n > self._rows:
            return [f"index: holds {index.ntotal} vectors, the manifest says {n} of {self._rows} rows"]
        ids = faiss.vector_to_array(index.id_map)
        if not np.array_equal(ids, np.arange(n)):
            return ["index: faiss ids are not the row numbers 0..N-1 in order"]
        if n and not np.allclose(index.index.reconstruct_n(0, n), _normalized(self._vectors[:n]), atol=1e-6):
            return ["index: stored vectors differ from the normalised rows"]
        if n < self._rows:
            warnings.append(f"index: covers {n} of {self._rows} rows; the rest are added when it is loaded")
        return []
