"""sha256 of source files, computed in a background thread while conversion reads."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

_CHUNK = 8 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            digest.update(view[:n])  # hashlib drops the GIL for large buffers
    return digest.hexdigest()


def hash_in_background(paths: Sequence[Path]) -> Future[dict[str, str]]:
    """Start hashing `paths`; the future gives {file name: sha256}."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="effconv-sha256")
    future = pool.submit(lambda: {p.name: sha256_file(p) for p in paths})
    pool.shutdown(wait=False)
    return future
