"""A minimal zip writer for uncompressed ("stored") entries with aligned data, as torch.save's files are.

Each entry's data is in memory when it is added, so its CRC-32 is computed first and
the local header is written once, complete: no seeking back, no data descriptors.
Zip64 records are written where a size, an offset or the entry count needs them.
The CRC-32 comes from ISA-L (the `isal` package, ~15 GB/s here; zlib's is ~2 GB/s),
falling back to zlib where isal is not installed.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

try:
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover (isal is a dependency; wheels exist for the common platforms)
    from zlib import crc32

ZIP64_LIMIT = 0xFFFFFFFF  # sizes and offsets at or above this go to zip64 fields (tests lower it)
MAX_ENTRIES = 0xFFFF  # entry counts at or above this need the zip64 end record (tests lower it)
_FULL32, _FULL16 = 0xFFFFFFFF, 0xFFFF  # "see the zip64 field" in 32- and 16-bit fields
_LOCAL = struct.Struct("<IHHHHHIIIHH")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_END = struct.Struct("<IHHHHIIH")
_END64 = struct.Struct("<IQHHIIQQQQ")
_LOCATOR64 = struct.Struct("<IIQI")
_DOS_DATE = (0 << 9) | (1 << 5) | 1  # 1980-01-01, 00:00: fixed, so the same weights give the same file
_PADDING_ID = 0x4246  # extra field holding the padding that aligns data (the id torch's writer uses)


class StoredZipWriter:
    """Write stored entries to `file` (a binary file positioned at 0); `close()` writes the directory.

    `add(name, data)` puts `data` (any contiguous buffer) at an offset that is a multiple
    of `alignment`. The caller closes `file`.
    """

    def __init__(self, file: BinaryIO, alignment: int = 64):
        self._file = file
        self._alignment = alignment
        self._offset = 0
        self._central: list[bytes] = []
        self._names: set[str] = set()

    @property
    def offset(self) -> int:
        """Bytes written so far."""
        return self._offset

    def add(self, name: str, data) -> None:
        view = memoryview(data).cast("B")
        if name in self._names:
            raise ValueError(f"zip entry {name!r} written twice")
        raw_name = name.encode()
        size, offset, crc = view.nbytes, self._offset, crc32(view)
        zip64 = size >= ZIP64_LIMIT
        sizes = b"" if not zip64 else struct.pack("<HHQQ", 1, 16, size, size)
        fixed = _LOCAL.size + len(raw_name) + 4 + len(sizes)
        pad = -(offset + fixed) % self._alignment
        extra = sizes + struct.pack("<HH", _PADDING_ID, pad) + b"\0" * pad
        small = _FULL32 if zip64 else size
        version = 45 if zip64 else 20
        header = _LOCAL.pack(0x04034B50, version, 0, 0, 0, _DOS_DATE, crc, small, small, len(raw_name), len(extra))
        self._file.write(header + raw_name + extra)
        self._file.write(view)
        self._offset = offset + len(header) + len(raw_name) + len(extra) + size
        self._names.add(name)
        self._central.append(self._central_record(raw_name, crc, size, offset))

    @staticmethod
    def _central_record(raw_name: bytes, crc: int, size: int, offset: int) -> bytes:
        fields = [size, size] if size >= ZIP64_LIMIT else []
        if offset >= ZIP64_LIMIT:
            fields.append(offset)
        extra = struct.pack(f"<HH{len(fields)}Q", 1, 8 * len(fields), *fields) if fields else b""
        small = _FULL32 if size >= ZIP64_LIMIT else size
        version = 45 if fields else 20
        head = _CENTRAL.pack(
            0x02014B50,
            version,
            version,
            0,
            0,
            0,
            _DOS_DATE,
            crc,
            small,
            small,
            len(raw_name),
            len(extra),
            0,
            0,
            0,
            0,
            _FULL32 if offset >= ZIP64_LIMIT else offset,
        )
        return head + raw_name + extra

    def close(self) -> None:
        """Write the central directory and its end records (zip64 ones where needed)."""
        directory = b"".join(self._central)
        start, count = self._offset, len(self._central)
        self._file.write(directory)
        end = start + len(directory)
        zip64 = count >= MAX_ENTRIES or start >= ZIP64_LIMIT or len(directory) >= ZIP64_LIMIT
        if zip64:
            record = (0x06064B50, _END64.size - 12, 45, 45, 0, 0, count, count, len(directory), start)
            self._file.write(_END64.pack(*record))
            self._file.write(_LOCATOR64.pack(0x07064B50, 0, end, 1))
        self._file.write(
            _END.pack(
                0x06054B50,
                0,
                0,
                _FULL16 if zip64 else count,
                _FULL16 if zip64 else count,
                _FULL32 if zip64 else len(directory),
                _FULL32 if zip64 else start,
                0,
            )
        )
        self._file.flush()
