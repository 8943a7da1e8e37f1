"""Writes whose failure is the output's fault (a full disk, a read-only folder): an OutputError naming the file.

Where reads and writes interleave (a download, a tarball being extracted), an OSError
alone cannot say which side failed (a dropped connection and a full disk are both
OSErrors): each write goes through `write_all`, and what is left is the input's.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import BinaryIO

from effconv.errors import OutputError, one_line


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Inside the block, an OSError is an OutputError: "cannot write PATH: reason"."""
    try:
        yield
    except OSError as e:
        raise OutputError(f"cannot write {os.fspath(path)}: {e.strerror or e}") from e


def create(path: str | os.PathLike, mode: str = "xb") -> BinaryIO:
    """`path` opened unbuffered for `write_all`: no buffered bytes for close() to fail on later."""
    with writing(path):
        return open(path, mode, buffering=0)  # noqa: SIM115 (the caller closes it)


def write_all(file: BinaryIO, data: bytes | memoryview, path: str | os.PathLike) -> None:
    """All of `data` to an unbuffered `file` (a raw write may take only part of it), else OutputError."""
    view = memoryview(data)
    with writing(path):
        while view:
            view = view[file.write(view) :]


def output_error(error: BaseException, path: str | os.PathLike) -> OutputError | None:
    """The OutputError naming `path` for a failed write (OSError, safetensors' own I/O error); None for
    anything else (a card that is not JSON, a bug): that is no disk problem and is raised as it is."""
    from safetensors import SafetensorError

    if isinstance(error, OSError):
        return OutputError(f"cannot write {os.fspath(path)}: {error.strerror or error}")
    if isinstance(error, SafetensorError):  # save_file's I/O errors: "Error while serializing: I/O error: ..."
        return OutputError(f"cannot write {os.fspath(path)}: {one_line(error)}")
    return None
