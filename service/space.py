"""One image-embedding space (a model_id): its store, the image tower that fills it, and the in-memory overlay."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from core.preprocess import ImageError
from export.runtime import Bundle
from export.store import EmbeddingStore, StoreError, StoreLocked, content_key
from service.metrics import Metrics

log = logging.getLogger(__name__)


class NameTaken(ValueError):
    """A user id that already names other content: a 409."""


@dataclass(frozen=True)
class ImageVector:
    sha256: str
    vector: np.ndarray  # (D,) float32
    cached: bool  # found in the store or overlay (False: encoded for this request)


class Space:
    """One image-embedding space (model_id): its store, the image tower that fills it, and an overlay.

    New vectors go to the in-memory overlay first and are committed to the store in the background
    (one commit for many rows, off the request path). While a `dide-cache build` holds the store's write
    lock they stay in the overlay, which is bounded (oldest dropped first: they can be encoded again).
    """

    def __init__(self, store: EmbeddingStore, encoder: Bundle, metrics: Metrics, overlay_max: int) -> None:
        self.store = store
        self.encoder = encoder
        self.model_id = encoder.model_id
        self.metrics = metrics
        self.overlay_max = overlay_max
        self._pending: OrderedDict[str, np.ndarray] = OrderedDict()
        self._names: dict[str, str] = {}  # user id -> sha256, for names still in the overlay
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._problem: str | None = None  # the last reason a commit failed, logged once
        # While this process writes to (or re-reads) the store, the store's reader lock may be held for a
        # whole commit (fsyncs included), so the event loop then looks ids up in a thread rather than inline.
        self.writing = 0

    @contextlib.contextmanager
    def _write_window(self) -> Iterator[None]:
        with self._lock:
            self.writing += 1
        try:
            yield
        finally:
            with self._lock:
                self.writing -= 1

    @property
    def pending(self) -> int:
        return len(self._pending)

    def lookup(self, key: str) -> tuple[str, np.ndarray] | None:
        """A sha256 or user id -> (sha256, vector), from the overlay or the store; None if unknown."""
        with self._lock:
            sha = key if key in self._pending else self._names.get(key)
            if sha is not None and sha in self._pending:
                return sha, self._pending[sha]
        return self.store.lookup(key)

    def encode(self, data: bytes) -> ImageVector:
        """Image bytes -> vector: from the store when their sha256 is known, else decoded and encoded now.

        Runs in a worker thread; raises ImageError for bytes that are not a usable image.
        """
        sha = content_key(data)
        with self.metrics.stage("lookup"):
            hit = self.lookup(sha)
        if hit is not None:
            self.metrics.hit("image")
            return ImageVector(sha, hit[1], cached=True)
        self.metrics.miss("image")
        with self.metrics.stage("decode"):
            try:
                pixels = self.encoder.preprocess_images([data])
            except ImageError:
                raise
            except Exception as e:  # image plugins raise many types on crafted files: all mean "unusable image"
                log.warning("the image decoder raised %s on a %d-byte image", type(e).__name__, len(data))
                raise ImageError(f"the image cannot be decoded ({type(e).__name__})") from None
        with self.metrics.stage("image_encode"):
            vector = self.encoder.encode_images(pixels)[0]
        self._remember(sha, vector)
        return ImageVector(sha, vector, cached=False)

    def _remember(self, sha: str, vector: np.ndarray) -> None:
        with self._lock:
            self._pending[sha] = vector
            self._pending.move_to_end(sha)
            while len(self._pending) > self.overlay_max:
                dropped, _ = self._pending.popitem(last=False)
                self._names = {n: s for n, s in self._names.items() if s != dropped}
                log.warning(
                    "store %s: overlay full (%d), dropped a vector not yet committed", self.model_id, self.overlay_max
                )

    def name(self, name: str, sha: str) -> None:
        """Map a user id to content in the overlay or store; NameTaken if it names other content."""
        have = self._names.get(name) or self.store.resolve(name)
        if have is not None and have != sha:
            raise NameTaken(f"the name {name!r} already names another image (sha256 {have}); names are permanent")
        if have is None:
            with self._lock:
                self._names[name] = sha

    def flush(self) -> bool:
        """Commit the overlay (and new names) to the store; whether it is now empty. Runs in a worker thread.

        A store locked by a cache build, or one that cannot be written (disk full, read-only), keeps the
        vectors in memory and is retried later; each distinct problem is logged once, not every round.
        """
        with self._flush_lock, self._write_window():
            with self._lock:
                pending = list(self._pending.items())
                names = dict(self._names)
            if not pending and not names:
                return True
            try:
                if pending:
                    self.store.add([sha for sha, _ in pending], np.stack([v for _, v in pending]))
                if names:
                    try:
                        self.store.add_ids(list(names.items()))
                    except ValueError as e:  # two uploads raced for one name: the first commit won
                        log.warning("store %s: names not recorded: %s", self.model_id, e)
            except StoreLocked:
                self._report(f"locked for writing by {self.store.locked_by() or 'another process'}", len(pending))
                return False
            except (OSError, StoreError) as e:  # disk full, read-only, or store files damaged under us
                self._report(f"cannot be written: {e}", len(pending))
                return False
            self._problem = None
            with self._lock:
                for sha, _ in pending:
                    self._pending.pop(sha, None)
                for n in names:
                    self._names.pop(n, None)
                return not self._pending and not self._names

    def _report(self, problem: str, n: int) -> None:
        if problem != self._problem:
            log.warning(
                "store %s is %s: keeping %d new vectors in memory until it can be written", self.model_id, problem, n
            )
            self._problem = problem

    def refresh(self) -> None:
        """Pick up rows another process (a cache build) committed. Runs in a worker thread."""
        with self._write_window():
            self.store.refresh()
