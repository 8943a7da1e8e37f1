"""Read TensorFlow checkpoints (tensor bundle V2) without TensorFlow.

A checkpoint `<prefix>` is an index `<prefix>.index` plus data shards
`<prefix>.data-<i>-of-<n>`. The index is a LevelDB-style table (SSTable) whose
key "" holds a `BundleHeaderProto` and whose every other key is a tensor name
holding a `BundleEntryProto` (dtype, shape, shard, offset, size, crc32c). The
shards are the raw little-endian tensor bytes, back to back.

`TensorBundleReader` parses the index when it opens and reads one tensor at a
time, like safetensors' `safe_open`: listing names, shapes and dtypes never
touches the data. Everything read from the index is checked against the real
file sizes before it sizes a read or an allocation.
"""

from __future__ import annotations

import math
import os
import stat
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import google_crc32c
import numpy as np

from effconv.errors import CheckpointError, UsageError
from effconv.formats.base import reused_buffer

try:  # ships with TensorFlow and JAX; without it bfloat16 comes back as raw uint16
    import ml_dtypes

    BFLOAT16: np.dtype = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - depends on the environment
    BFLOAT16 = np.dtype("<u2")

__all__ = ["BFLOAT16", "TensorBundleReader", "TensorInfo", "data_shard_path", "mask_crc32c", "unmask_crc32c"]

_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_SIZE = 48  # two block handles padded to 40 bytes, then the 8-byte magic
_TRAILER_SIZE = 5  # compression type byte + masked crc32c of (block + type byte)
_NO_COMPRESSION, _SNAPPY = 0, 1
_CRC_MASK_DELTA = 0xA282EAD8
_BUNDLE_VERSION = 1  # the bundle format version this reader implements
_MAX_SHARDS = 100_000  # shard numbers are written with five digits
_MAX_VARINT_BYTES = 10
_UINT64 = 1 << 64
_MAX_RANK = 32  # numpy 1.x refuses more dimensions (numpy 2: 64); TF allows 254
_MAX_ARRAY_BYTES = np.iinfo(np.intp).max  # numpy refuses shapes whose byte size overflows, even empty ones
# Prefix-compressed keys cost time and memory by their full length. TF restarts the
# compression every 16 keys, which bounds honest keys at 16x the index's bytes.
_KEY_BYTES_PER_INDEX_BYTE = 32

# TF DataType enum -> (name, dtype); a None dtype means read() refuses it.
_DTYPES: dict[int, tuple[str, np.dtype | None]] = {
    1: ("float32", np.dtype("<f4")),
    2: ("float64", np.dtype("<f8")),
    3: ("int32", np.dtype("<i4")),
    4: ("uint8", np.dtype("u1")),
    5: ("int16", np.dtype("<i2")),
    6: ("int8", np.dtype("i1")),
    7: ("string", None),
    8: ("complex64", np.dtype("<c8")),
    9: ("int64", np.dtype("<i8")),
    10: ("bool", np.dtype("?")),
    11: ("qint8", None),
    12: ("quint8", None),
    13: ("qint32", None),
    14: ("bfloat16", BFLOAT16),
    15: ("qint16", None),
    16: ("quint16", None),
    17: ("uint16", np.dtype("<u2")),
    18: ("complex128", np.dtype("<c16")),
    19: ("float16", np.dtype("<f2")),
    20: ("resource", None),
    21: ("variant", None),
    22: ("uint32", np.dtype("<u4")),
    23: ("uint64", np.dtype("<u8")),
}
_NO_DTYPE = np.dtype(object)


class _FormatError(ValueError):
    """Malformed index bytes; the reader turns it into a CheckpointError naming the file."""


def mask_crc32c(crc: int) -> int:
    """LevelDB's crc masking (rotate right by 15, add a constant), used for blocks and tensors."""
    return ((crc >> 15 | crc << 17) + _CRC_MASK_DELTA) & 0xFFFFFFFF


def unmask_crc32c(masked: int) -> int:
    rotated = (masked - _CRC_MASK_DELTA) & 0xFFFFFFFF
    return (rotated >> 17 | rotated << 15) & 0xFFFFFFFF


def data_shard_path(prefix: str | os.PathLike, shard: int, num_shards: int) -> Path:
    return Path(f"{os.fspath(prefix)}.data-{shard:05d}-of-{num_shards:05d}")


def _crc32c(data: bytes, length: int) -> int:
    # The C extension takes bytes and numpy arrays but not memoryviews: view, do not slice-copy.
    return google_crc32c.value(np.frombuffer(data, dtype=np.uint8, count=length))


# --- protobuf wire format -------------------------------------------------------


def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    for i in range(pos, min(end, pos + _MAX_VARINT_BYTES)):
        byte = buf[i]
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result & (_UINT64 - 1), i + 1
        shift += 7
    raise _FormatError("truncated or overlong varint")


def _signed(value: int) -> int:
    """int32/int64 fields are sign-extended to 64 bits on the wire."""
    return value - _UINT64 if value >= _UINT64 >> 1 else value


def _fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of each field of one message."""
    pos, end = 0, len(buf)
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise _FormatError("protobuf field number 0")
        value: int | bytes
        if wire == 0:
            value, pos = _varint(buf, pos, end)
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            if pos + width > end:
                raise _FormatError("truncated fixed-width protobuf field")
            value, pos = int.from_bytes(buf[pos : pos + width], "little"), pos + width
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if length > end - pos:
                raise _FormatError("protobuf length runs past its message")
            value, pos = buf[pos : pos + length], pos + length
        else:
            raise _FormatError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def _expect(wire: int, expected: int, field: str) -> None:
    if wire != expected:
        raise _FormatError(f"field {field} has wire type {wire}, expected {expected}")


@dataclass(frozen=True)
class _Header:
    num_shards: int
    big_endian: bool
    min_consumer: int
    bad_consumers: tuple[int, ...]


def _parse_header(buf: bytes) -> _Header:
    num_shards, big_endian = 0, False
    min_consumer, bad_consumers = 0, []
    for number, wire, value in _fields(buf):
        if number == 1:
            _expect(wire, 0, "num_shards")
            num_shards = _signed(value)
        elif number == 2:
            _expect(wire, 0, "endianness")
            big_endian = value == 1
        elif number == 3:
            _expect(wire, 2, "version")
            for vnum, vwire, vvalue in _fields(value):
                if vnum == 2 and vwire == 0:
                    min_consumer = _signed(vvalue)
                elif vnum == 3 and vwire == 0:
                    bad_consumers.append(_signed(vvalue))
                elif vnum == 3 and vwire == 2:  # packed
                    pos = 0
                    while pos < len(vvalue):
                        item, pos = _varint(vvalue, pos, len(vvalue))
                        bad_consumers.append(_signed(item))
    return _Header(num_shards, big_endian, min_consumer, tuple(bad_consumers))


@dataclass(frozen=True)
class _Entry:
    dtype: int
    shape: tuple[int, ...] | None  # None: unknown rank
    shard: int
    offset: int
    size: int
    masked_crc: int
    sliced: bool


def _parse_shape(buf: bytes) -> tuple[int, ...] | None:
    dims: list[int] = []
    unknown_rank = False
    for number, wire, value in _fields(buf):
        if number == 2:
            _expect(wire, 2, "shape.dim")
            size = 0
            for dnum, dwire, dvalue in _fields(value):
                if dnum == 1:
                    _expect(dwire, 0, "shape.dim.size")
                    size = _signed(dvalue)
            dims.append(size)
        elif number == 3:
            _expect(wire, 0, "shape.unknown_rank")
            unknown_rank = bool(value)
    return None if unknown_rank else tuple(dims)


def _parse_entry(buf: bytes) -> _Entry:
    dtype = shard = offset = size = crc = 0
    shape: tuple[int, ...] | None = ()
    sliced = False
    for number, wire, value in _fields(buf):
        if number == 1:
            _expect(wire, 0, "dtype")
            dtype = _signed(value)
        elif number == 2:
            _expect(wire, 2, "shape")
            shape = _parse_shape(value)
        elif number == 3:
            _expect(wire, 0, "shard_id")
            shard = _signed(value)
        elif number == 4:
            _expect(wire, 0, "offset")
            offset = _signed(value)
        elif number == 5:
            _expect(wire, 0, "size")
            size = _signed(value)
        elif number == 6:
            _expect(wire, 5, "crc32c")
            crc = value
        elif number == 7:
            sliced = True
    return _Entry(dtype, shape, shard, offset, size, crc, sliced)


# --- SSTable ----------------------------------------------------------------------


def _read_block(f: BinaryIO, file_size: int, handle: bytes) -> bytes:
    """The contents of the block a BlockHandle (two varints) points at, crc-checked."""
    offset, pos = _varint(handle, 0, len(handle))
    size, _ = _varint(handle, pos, len(handle))
    if offset + size + _TRAILER_SIZE > file_size - _FOOTER_SIZE:
        raise _FormatError(f"block at {offset} of {size} bytes runs past the end of the file")
    f.seek(offset)
    raw = f.read(size + _TRAILER_SIZE)
    if len(raw) != size + _TRAILER_SIZE:
        raise _FormatError("file shorter than its block handles")
    (stored,) = struct.unpack_from("<I", raw, size + 1)
    if unmask_crc32c(stored) != _crc32c(raw, size + 1):
        raise _FormatError(f"crc32c mismatch in block at offset {offset}")
    compression = raw[size]
    if compression == _SNAPPY:
        raise _FormatError("snappy-compressed index blocks are not supported")
    if compression != _NO_COMPRESSION:
        raise _FormatError(f"unknown block compression type {compression}")
    return raw[:size]


def _block_items(block: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) pairs of a block: prefix-compressed keys, restart array at the end.

    Keys are rebuilt in full, so their total length can exceed the block's; the
    caller bounds it.
    """
    if len(block) < 4:
        raise _FormatError("block shorter than its restart count")
    (num_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    limit = len(block) - 4 - 4 * num_restarts
    if limit < 0:
        raise _FormatError("block restart array larger than the block")
    key, pos = b"", 0
    while pos < limit:
        shared, pos = _varint(block, pos, limit)
        unshared, pos = _varint(block, pos, limit)
        value_len, pos = _varint(block, pos, limit)
        if shared > len(key) or unshared + value_len > limit - pos:
            raise _FormatError("block entry runs past its block")
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        yield key, block[pos : pos + value_len]
        pos += value_len


def _table_items(f: BinaryIO, file_size: int) -> Iterator[tuple[bytes, bytes]]:
    if file_size < _FOOTER_SIZE:
        raise _FormatError(f"{file_size} bytes is too short for a table footer")
    f.seek(file_size - _FOOTER_SIZE)
    footer = f.read(_FOOTER_SIZE)
    if len(footer) != _FOOTER_SIZE or struct.unpack_from("<Q", footer, 40)[0] != _TABLE_MAGIC:
        raise _FormatError("bad table magic number (not a checkpoint index)")
    _, pos = _varint(footer, 0, 40)  # metaindex handle: no filters in a bundle index
    _, pos = _varint(footer, pos, 40)
    index_handle = footer[pos:40]
    # Data blocks must follow each other in the file, as a table writer lays them out: an
    # index that points at one block many times would otherwise make us read it many times.
    next_offset, key_bytes = 0, 0
    for _, data_handle in _block_items(_read_block(f, file_size, index_handle)):
        offset, pos = _varint(data_handle, 0, len(data_handle))
        if offset < next_offset:
            raise _FormatError(f"data block at {offset} overlaps the block before it")
        size, _ = _varint(data_handle, pos, len(data_handle))
        next_offset = offset + size + _TRAILER_SIZE
        for key, value in _block_items(_read_block(f, file_size, data_handle)):
            key_bytes += len(key)
            if key_bytes > _KEY_BYTES_PER_INDEX_BYTE * file_size:
                raise _FormatError("tensor names add up to far more bytes than the index holds")
            yield key, value


def _is_slice_key(key: bytes) -> bool:
    # Slices of partitioned tensors are stored under OrderedCode-encoded keys, which start with a zero byte.
    return key.startswith(b"\x00")


def _parse_index(f: BinaryIO, file_size: int) -> tuple[_Header, dict[str, _Entry], list[_Entry]]:
    """Header, tensor entries by name (index order) and the hidden slice entries."""
    header: _Header | None = None
    entries: dict[str, _Entry] = {}
    slices: list[_Entry] = []
    previous: bytes | None = None
    for key, value in _table_items(f, file_size):
        if previous is not None and key <= previous:
            what = "duplicate tensor name" if key == previous else "index keys out of order at"
            raise _FormatError(f"{what} {key.decode('utf-8', 'replace')!r}")
        previous = key
        if key == b"":
            header = _parse_header(value)
        elif _is_slice_key(key):
            slices.append(_parse_entry(value))
        else:
            try:
                name = key.decode("utf-8")
            except UnicodeDecodeError:
                raise _FormatError(f"tensor name {key!r} is not UTF-8") from None
            entries[name] = _parse_entry(value)
    if header is None:
        raise _FormatError("no bundle header (empty key) in the index")
    return header, entries, slices


# --- the reader ------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, straight from the index.

    `dtype` is little endian; bfloat16 is `ml_dtypes.bfloat16` when ml_dtypes is
    installed, else `uint16` holding the raw bits (`dtype_name` still says
    "bfloat16"). `crc32c` is the plain crc32c of the tensor's bytes (the index
    stores it masked). `unsupported` says why `read` refuses the tensor (string,
    resource, variant, quantized dtypes, partitioned tensors); `dtype` is then
    `object`.
    """

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int
    crc32c: int
    dtype_name: str = ""
    unsupported: str | None = None

    @property
    def nbytes(self) -> int:
        return self.size


def _tensor_info(name: str, entry: _Entry) -> TensorInfo:
    """Checks an entry's own consistency; shard bounds are the reader's job."""
    dtype_name, dtype = _DTYPES.get(entry.dtype, (f"DataType {entry.dtype}", None))
    if entry.shape is None:
        raise _FormatError(f"tensor {name!r} has an unknown rank")
    if any(d < 0 for d in entry.shape):
        raise _FormatError(f"tensor {name!r} has a negative dimension in shape {entry.shape}")
    if entry.offset < 0 or entry.size < 0:
        raise _FormatError(f"tensor {name!r} has a negative offset or size")
    if math.prod(d for d in entry.shape if d) * (dtype.itemsize if dtype else 1) > _MAX_ARRAY_BYTES:
        raise _FormatError(f"tensor {name!r} has an impossibly large shape {entry.shape}")
    unsupported = None
    if entry.sliced:
        unsupported = "partitioned (sliced) tensor"
    elif dtype is None:
        unsupported = f"dtype {dtype_name}"
    elif len(entry.shape) > _MAX_RANK:
        unsupported = f"rank {len(entry.shape)} (numpy arrays have at most {_MAX_RANK} dimensions here)"
    elif entry.size != math.prod(entry.shape) * dtype.itemsize:
        raise _FormatError(f"tensor {name!r} of shape {entry.shape} and dtype {dtype_name} has {entry.size} bytes")
    return TensorInfo(
        name=name,
        dtype=_NO_DTYPE if unsupported else dtype,
        shape=entry.shape,
        shard=entry.shard,
        offset=entry.offset,
        size=entry.size,
        crc32c=unmask_crc32c(entry.masked_crc),
        dtype_name=dtype_name,
        unsupported=unsupported,
    )


class TensorBundleReader:
    """Lazy reader of one TF checkpoint: `keys()`, `info(name)`, `read(name)`.

    Opening parses only the index and checks that every data shard exists and is
    long enough for the tensors it should hold. Shard files are opened on first
    use, one handle each, and closed by `close()` / the context manager. Reads are
    serialised by a lock, so one reader may be shared between threads.
    """

    checksummed = True  # read() checks each tensor's crc32c: reading is checking

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.prefix = Path(prefix)
        self.index_path = Path(f"{os.fspath(prefix)}.index")
        try:
            if not stat.S_ISREG(os.stat(self.index_path).st_mode):  # a FIFO would block open() for ever
                raise CheckpointError(f"checkpoint index {self.index_path} is not a regular file")
            with open(self.index_path, "rb") as f:
                header, entries, slices = _parse_index(f, os.fstat(f.fileno()).st_size)
                self._infos = {name: _tensor_info(name, entry) for name, entry in entries.items()}
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint index not found: {self.index_path}") from None
        except OSError as e:
            raise CheckpointError(f"cannot read checkpoint index {self.index_path}: {e.strerror}") from None
        except _FormatError as e:
            raise CheckpointError(f"corrupted checkpoint index {self.index_path}: {e}") from None
        self._check_header(header, has_entries=bool(entries or slices))
        self.num_shards = header.num_shards
        self.shard_paths = tuple(data_shard_path(prefix, i, self.num_shards) for i in range(self.num_shards))
        shard_sizes = [self._shard_size(path) for path in self.shard_paths]
        for info in self._infos.values():
            self._check_fits(info.name, info.shard, info.offset, info.size, shard_sizes)
        for entry in slices:
            self._check_fits("<slice of a partitioned tensor>", entry.shard, entry.offset, entry.size, shard_sizes)
        self._names = list(self._infos)
        self._nbytes = sum(info.size for info in self._infos.values()) + sum(e.size for e in slices)
        self._files: dict[int, BinaryIO] = {}
        self._lock = threading.Lock()
        self._closed = False

    def _check_header(self, header: _Header, has_entries: bool) -> None:
        where = f"checkpoint index {self.index_path}"
        if header.big_endian:
            raise CheckpointError(f"unsupported big-endian tensor bundle: {where}")
        if header.min_consumer > _BUNDLE_VERSION or _BUNDLE_VERSION in header.bad_consumers:
            raise CheckpointError(
                f"unsupported bundle version (needs a reader of version {header.min_consumer}): {where}"
            )
        if not 0 <= header.num_shards <= _MAX_SHARDS or (has_entries and header.num_shards == 0):
            raise CheckpointError(f"corrupted {where}: bad shard count {header.num_shards}")

    @staticmethod
    def _shard_size(path: Path) -> int:
        try:
            status = path.stat()
        except FileNotFoundError:
            raise CheckpointError(f"missing data shard {path}") from None
        except OSError as e:
            raise CheckpointError(f"cannot read data shard {path}: {e.strerror}") from None
        if not stat.S_ISREG(status.st_mode):
            raise CheckpointError(f"data shard {path} is not a regular file")
        return status.st_size

    def _check_fits(self, name: str, shard: int, offset: int, size: int, shard_sizes: list[int]) -> None:
        if not 0 <= shard < self.num_shards:
            raise CheckpointError(
                f"corrupted checkpoint index {self.index_path}: tensor {name!r} is in shard {shard} "
                f"of {self.num_shards}"
            )
        if offset + size > shard_sizes[shard]:
            raise CheckpointError(
                f"truncated data file {self.shard_paths[shard]}: tensor {name!r} needs bytes "
                f"{offset}..{offset + size} but the file has {shard_sizes[shard]}"
            )

    # --- listing ---

    def keys(self) -> list[str]:
        """Tensor names in index order (sorted as text, like `tf.train.list_variables`)."""
        return list(self._names)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise CheckpointError(f"no tensor {name!r} in checkpoint {self.prefix}") from None

    def infos(self) -> list[TensorInfo]:
        return [self._infos[name] for name in self._names]

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._names)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    @property
    def nbytes(self) -> int:
        """Total tensor bytes the index refers to."""
        return self._nbytes

    def __repr__(self) -> str:
        return f"TensorBundleReader({os.fspath(self.prefix)!r}: {len(self)} tensors, {self.num_shards} shard(s))"

    # --- reading ---

    def read(self, name: str, verify: bool = True, out: np.ndarray | None = None) -> np.ndarray:
        """One tensor as a little-endian array; `verify` checks its crc32c.

        The array is fresh, or a view into the front of `out` (a uint8 buffer of at least
        `info(name).size` bytes, reused across calls to spare the page faults of fresh memory).
        """
        info = self.info(name)
        if info.unsupported:
            raise CheckpointError(f"unsupported {info.unsupported}: tensor {name!r} in {self.index_path}")
        buffer = reused_buffer(out, info.size)
        if buffer is None:
            buffer = np.empty(info.size, dtype=np.uint8)
        path = self.shard_paths[info.shard]
        if info.size:
            with self._lock:
                f = self._shard_file(info.shard)
                f.seek(info.offset)
                got = read_into(f, buffer)
            if got != info.size:
                raise CheckpointError(f"truncated data file {path}: tensor {name!r} got {got} of {info.size} bytes")
        if verify and google_crc32c.value(buffer) != info.crc32c:
            raise CheckpointError(f"crc32c mismatch in tensor {name!r} of {path}: the data file is corrupted")
        return buffer.view(info.dtype).reshape(info.shape)

    def _shard_file(self, shard: int) -> BinaryIO:
        if self._closed:
            raise UsageError(f"{self!r} is closed")
        f = self._files.get(shard)
        if f is None:
            try:
                f = open(self.shard_paths[shard], "rb", buffering=0)  # kept open until close()
            except OSError as e:
                raise CheckpointError(f"cannot open data shard {self.shard_paths[shard]}: {e.strerror}") from None
            self._files[shard] = f
        return f

    def close(self) -> None:
        with self._lock:
            self._closed = True
            files, self._files = self._files, {}
        for f in files.values():
            f.close()

    def __enter__(self) -> TensorBundleReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_into(f: BinaryIO, buffer: np.ndarray | memoryview) -> int:
    """Fill `buffer` from `f`; returns the bytes read (short only at end of file)."""
    view = memoryview(buffer)
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got
