"""sha256 of source files, computed in a background thread while other work goes on.

`prefetch(paths)` starts hashing early (the CLI calls it before importing torch, which
keeps one core busy for ~1 s while the other would idle); `hash_in_background(paths)`
reuses that work for each file still unchanged (same size, mtime and inode) and hashes
the others.

Only regular files are hashed: a named pipe or a device (a shard linked to /dev/zero)
would block or never end. The hashing threads are daemons, so that an error elsewhere
ends the process at once instead of waiting for a hash nobody will read.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path

from effconv.errors import CheckpointError

_CHUNK = 8 << 20
_FileKey = tuple[str, int, int, int]
_started: dict[_FileKey, Future[str]] = {}
_lock = threading.Lock()


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of a regular file, read in large blocks (model cards, downloads and verify all use this one).

    Anything else (a named pipe, a device, a folder) is refused before a byte is read: opening is
    non-blocking, and the opened file itself is checked, so a swap after a check cannot slip through.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise CheckpointError(f"cannot read {os.fspath(path)} to hash it: {e.strerror or e}") from None
    with open(fd, "rb", buffering=0) as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointError(f"{os.fspath(path)} is not a regular file; only regular files are hashed")
        digest = hashlib.sha256()
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            digest.update(view[:n])  # hashlib drops the GIL for large buffers
    return digest.hexdigest()


def _key(path: Path) -> _FileKey:
    st = os.stat(path)
    return (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino)


def _hash_all(todo: Sequence[tuple[Path, Future[str]]]) -> None:
    """Hash the files one after the other (one thread: they share one disk), each into its future."""
    for path, future in todo:
        try:
            future.set_result(sha256_file(path))
        except BaseException as e:  # handed to whoever asks for the result
            future.set_exception(e)


def _start(paths: Sequence[Path]) -> list[Future[str]]:
    """A future per file: one already started for it while unchanged, else a new one."""
    futures, todo = [], []
    with _lock:
        for path in paths:
            key = _key(path)
            future = _started.get(key)
            if future is None or (future.done() and future.exception() is not None):
                future = _started[key] = Future()
                future.set_running_or_notify_cancel()
                todo.append((path, future))
            futures.append(future)
    if todo:  # a daemon, unlike an executor's worker: it never holds the process open after an error
        threading.Thread(target=_hash_all, args=(todo,), name="effconv-sha256", daemon=True).start()
    return futures


def prefetch(paths: Sequence[Path]) -> None:
    """Start hashing `paths` now, for a later `hash_in_background` of the same files."""
    _start(paths)


class Hashes:
    """{file name: sha256} of files being hashed; `result()` waits for them."""

    def __init__(self, paths: Sequence[Path], futures: list[Future[str]]):
        self._paths, self._futures = list(paths), futures

    def result(self) -> dict[str, str]:
        return {p.name: f.result() for p, f in zip(self._paths, self._futures, strict=True)}


def hash_in_background(paths: Sequence[Path]) -> Hashes:
    """Start hashing `paths` (or reuse a `prefetch` of the unchanged ones)."""
    return Hashes(paths, _start(paths))
