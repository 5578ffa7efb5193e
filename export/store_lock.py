"""The embedding store's write lock: an fcntl.flock on DIR/write.lock that names its holder in messages."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from export.store_layout import StoreLocked


class WriteLock:
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
