"""A `torch.save`-format state dict written one tensor at a time, never held whole in memory.

`torch.save(state_dict, path)` needs every tensor in memory at once: for an
L2-sized conversion that is 1.8 GB of freshly allocated (page-faulted, zeroed)
memory on top of the source being read, and a second pass over it to write.
`StreamingStateDictWriter` writes each tensor's bytes into the zip archive as
soon as it is made (the caller can reuse one scratch buffer for every
transpose), then the pickle that names them, last. The file holds the records
torch.save writes (data.pkl, data/N storages 64-byte aligned, byteorder,
version, ...), so `torch.load(path, weights_only=True)` (mmap or not) reads it
unchanged.

The zip container is written by `effconv.output.zipstore` rather than torch's own
writer: its CRC-32 (ISA-L) is ~15x faster than the one torch's bundled miniz
computes, and a failed write (a full disk) is an ordinary OSError instead of a
C++ exception that torch's writer raises again from its destructor, ending
the process.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import secrets
import sys
from collections import OrderedDict

import torch

from effconv.errors import UsageError
from effconv.output.zipstore import StoredZipWriter

# dtype -> the storage class name torch's unpickler (weights_only included) rebuilds it with
STORAGE_TYPES: dict[torch.dtype, str] = {
    torch.float32: "FloatStorage",
    torch.float64: "DoubleStorage",
    torch.float16: "HalfStorage",
    torch.bfloat16: "BFloat16Storage",
    torch.int64: "LongStorage",
    torch.int32: "IntStorage",
    torch.int8: "CharStorage",
    torch.uint8: "ByteStorage",
    torch.bool: "BoolStorage",
}
STORAGE_ALIGNMENT = 64  # torch.save's default
WRITEBACK_CHUNK = 64 << 20  # start the disk writing every 64 MB written
ARCHIVE = "archive"  # the folder every record sits in (torch.save's name for file objects)
FORMAT_VERSION = "3\n"  # the `version` record torch.save writes


class _Storage:
    """Stands for one written record in the pickle (torch's persistent id)."""

    __slots__ = ("key", "dtype", "numel")

    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _Tensor:
    """Pickles as the contiguous CPU tensor torch.save writes for a record."""

    __slots__ = ("storage", "shape")

    def __init__(self, storage: _Storage, shape: tuple[int, ...]):
        self.storage, self.shape = storage, shape

    def __reduce_ex__(self, protocol):
        strides, step = [], 1
        for n in reversed(self.shape):
            strides.append(step)
            step *= max(n, 1)
        args = (self.storage, 0, self.shape, tuple(reversed(strides)), False, OrderedDict())
        return torch._utils._rebuild_tensor_v2, args


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", getattr(torch, STORAGE_TYPES[obj.dtype]), obj.key, "cpu", obj.numel)
        return None


class StreamingStateDictWriter:
    """`add(name, tensor)` writes the tensor now; `close()` writes the state dict's pickle and the zip directory.

    Names come out of `torch.load` in the order given to `close(order)` (default: the order added);
    `close(wrap_key=K, meta=M)` pickles `{K: state_dict, "meta": M}` instead (mmpretrain's wrapping).
    Use as a context manager: on an exception the writer is abandoned (`abort`) and the partial
    file is left for the caller to remove (write to a temporary name and rename, as
    `effconv.output.artifact` does).
    """

    def __init__(self, path: str | os.PathLike):
        # Not open(path, "wb"): truncating an existing file (the empty temporary effconv.output.artifact
        # made) makes ext4 flush the whole file to disk when it is closed (auto_da_alloc).
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        if os.fstat(fd).st_size:
            os.ftruncate(fd, 0)
        self._file = open(fd, "wb")  # noqa: SIM115 (closed by close/abort)
        self._zip = StoredZipWriter(self._file, STORAGE_ALIGNMENT)
        self._tensors: dict[str, _Tensor] = {}
        self._closed = False
        self._dropped = self._flushed = 0  # bytes dropped from memory, and handed to the disk (_start_writeback)

    def _record(self, name: str, data) -> None:
        self._zip.add(f"{ARCHIVE}/{name}", data)
        if self._zip.offset - self._flushed >= WRITEBACK_CHUNK:
            self._start_writeback()

    def _start_writeback(self) -> None:
        """Start writing what is written so far to disk, and drop what is already on disk from memory.

        Called every WRITEBACK_CHUNK bytes. POSIX_FADV_DONTNEED starts the writeback of the
        newest chunk without waiting (the caller's final fsync, before its rename, then
        waits for the last chunk only: ~0.8 s less at L2 size) and drops the pages of the
        chunk before it, written out by now. Those pages are reused for the next chunks:
        a conversion never fills the page cache with a copy of its output (the RAM stays
        for the source and other work), and on a virtual machine reused pages are much
        cheaper to write into than memory not touched in a while.
        """
        if not hasattr(os, "posix_fadvise"):
            return
        self._file.flush()
        end = self._zip.offset
        with contextlib.suppress(OSError):
            fd = self._file.fileno()
            os.posix_fadvise(fd, self._dropped, self._flushed - self._dropped, os.POSIX_FADV_DONTNEED)
            os.posix_fadvise(fd, self._flushed, end - self._flushed, os.POSIX_FADV_DONTNEED)
        self._dropped, self._flushed = self._flushed, end

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write `tensor`'s bytes now; the caller may reuse its memory as soon as this returns."""
        if self._closed:
            raise UsageError(f"cannot add {name!r}: the writer is closed")
        if name in self._tensors:
            raise UsageError(f"tensor {name!r} written twice")
        if tensor.dtype not in STORAGE_TYPES:
            raise UsageError(f"cannot stream a {tensor.dtype} tensor ({name!r})")
        tensor = tensor.detach().cpu().contiguous()
        data = tensor.reshape(-1).view(torch.uint8).numpy()  # its own bytes, even as a view into more
        key = str(len(self._tensors))
        try:
            self._record(f"data/{key}", data)
        except BaseException:
            self.abort()
            raise
        self._tensors[name] = _Tensor(_Storage(key, tensor.dtype, tensor.numel()), tuple(tensor.shape))

    def close(self, order: list[str] | None = None, wrap_key: str | None = None, meta: object = None) -> None:
        """Write the pickle naming the tensors (in `order`), the small records and the zip directory."""
        if self._closed:
            return
        names = list(self._tensors) if order is None else list(order)
        if len(names) != len(self._tensors) or set(names) != set(self._tensors):
            raise UsageError("close(order) must name every tensor written, once")
        state = {name: self._tensors[name] for name in names}
        buffer = io.BytesIO()
        _Pickler(buffer, protocol=2).dump({wrap_key: state, "meta": meta} if wrap_key else state)
        serialization_id = f"{secrets.randbits(64):020d}{secrets.randbits(64):020d}"
        records = {
            "data.pkl": buffer.getvalue(),
            ".format_version": b"1",
            ".storage_alignment": str(STORAGE_ALIGNMENT).encode(),
            "byteorder": sys.byteorder.encode(),
            "version": FORMAT_VERSION.encode(),
            ".data/serialization_id": serialization_id.encode(),
        }
        try:
            for name, data in records.items():
                self._record(name, data)
            self._closed = True
            self._zip.close()
            self._file.close()
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Give up on the file (its content is undefined) without raising."""
        self._closed = True
        # close() flushes what is buffered, which fails again on a full disk: the first error was raised.
        with contextlib.suppress(OSError):
            self._file.close()

    def __enter__(self) -> StreamingStateDictWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
