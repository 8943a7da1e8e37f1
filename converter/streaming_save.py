"""A `torch.save`-format state dict written one tensor at a time, never held whole in memory.

`torch.save(state_dict, path)` needs every tensor in memory at once: for an
L2-sized conversion that is 1.8 GB of freshly allocated (page-faulted, zeroed)
memory on top of the source being read, and a second pass over it to write.
`StreamingStateDictWriter` writes each tensor's bytes into the zip archive as
soon as it is made (the caller can reuse one scratch buffer for every
transpose), then the pickle that names them, last. The file is the one
torch.save would write (same records, 64-byte aligned storages, zip CRCs),
so `torch.load(path, weights_only=True)` (mmap or not) reads it unchanged.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import sys
from collections import OrderedDict

import torch

from effconv.errors import UsageError

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
    `effconv.artifact` does).
    """

    def __init__(self, path: str | os.PathLike, compute_crc32: bool = True):
        self._zip = torch._C.PyTorchFileWriter(str(path), compute_crc32, STORAGE_ALIGNMENT)
        self._tensors: dict[str, _Tensor] = {}
        self._closed = False  # no more records
        self._finished = False  # write_end_of_file called (once is all torch allows)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write `tensor`'s bytes now; the caller may reuse its memory as soon as this returns."""
        if self._closed:
            raise UsageError(f"cannot add {name!r}: the writer is closed")
        if name in self._tensors:
            raise UsageError(f"tensor {name!r} written twice")
        if tensor.dtype not in STORAGE_TYPES:
            raise UsageError(f"cannot stream a {tensor.dtype} tensor ({name!r})")
        tensor = tensor.detach().cpu().contiguous()
        storage = tensor.untyped_storage()
        if tensor.storage_offset() or storage.nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()  # a view into a larger buffer: write only its own bytes
            storage = tensor.untyped_storage()
        key = str(len(self._tensors))
        try:
            self._zip.write_record(f"data/{key}", storage, storage.nbytes())
        except BaseException:
            self.abort()
            raise
        self._tensors[name] = _Tensor(_Storage(key, tensor.dtype, tensor.numel()), tuple(tensor.shape))

    def close(self, order: list[str] | None = None, wrap_key: str | None = None, meta: object = None) -> None:
        if self._closed:
            return
        names = list(self._tensors) if order is None else list(order)
        if len(names) != len(self._tensors) or set(names) != set(self._tensors):
            raise UsageError("close(order) must name every tensor written, once")
        state = {name: self._tensors[name] for name in names}
        buffer = io.BytesIO()
        _Pickler(buffer, protocol=2).dump({wrap_key: state, "meta": meta} if wrap_key else state)
        data = buffer.getvalue()
        try:
            self._zip.write_record("data.pkl", data, len(data))
            for record, text in ((".format_version", "1"), (".storage_alignment", str(STORAGE_ALIGNMENT))):
                self._zip.write_record(record, text, len(text))
            self._zip.write_record("byteorder", sys.byteorder, len(sys.byteorder))
            self._closed = self._finished = True
            self._zip.write_end_of_file()
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Give up on the file (its content is undefined) without raising.

        torch's zip writer finishes the archive in its destructor when nobody did; if writing
        failed (a full disk), that second failure inside a destructor ends the whole process.
        One explicit, failed `write_end_of_file` marks the writer finished, so the destructor
        does nothing.
        """
        self._closed = True
        if not self._finished:
            self._finished = True
            with contextlib.suppress(Exception):
                self._zip.write_end_of_file()

    def __enter__(self) -> StreamingStateDictWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
