"""sha256 of source files, computed in a background thread while other work goes on.

`prefetch(paths)` starts hashing early (the CLI calls it before importing torch, which
keeps one core busy for ~1 s while the other would idle); `hash_in_background(paths)`
reuses that work for each file still unchanged (same size, mtime and inode) and hashes
the others.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

_CHUNK = 8 << 20
_FileKey = tuple[str, int, int, int]
_started: dict[_FileKey, Future[str]] = {}
_lock = threading.Lock()


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of a file, read in large blocks (model cards, downloads and verify all use this one)."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            digest.update(view[:n])  # hashlib drops the GIL for large buffers
    return digest.hexdigest()


def _key(path: Path) -> _FileKey:
    st = os.stat(path)
    return (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino)


def _start(paths: Sequence[Path]) -> list[Future[str]]:
    """A future per file: one already started for it while unchanged, else a new one."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="effconv-sha256")
    futures = []
    with _lock:
        for path in paths:
            key = _key(path)
            future = _started.get(key)
            if future is None or (future.done() and future.exception() is not None):
                future = _started[key] = pool.submit(sha256_file, path)
            futures.append(future)
    pool.shutdown(wait=False)
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
