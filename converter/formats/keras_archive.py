"""A Keras 3 `.keras` archive: a zip of `metadata.json`, `config.json` (the model's graph) and `model.weights.h5`.

Keras writes the members stored, not compressed, so the weights store is a plain byte range of the
archive: `KerasArchive` finds it from the zip's directory and its member's local header, and the store
is read in place (`Keras3WeightsStore(path, start=..., size=...)`). A compressed store (an archive
zipped again by another tool) is streamed into a temporary file instead, never into memory. Only the two
small JSON members are read whole, up to a size no honest model reaches.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from effconv.errors import CheckpointError, one_line

__all__ = ["KerasArchive"]

WEIGHTS_MEMBER = "model.weights.h5"
CONFIG_MEMBER = "config.json"
METADATA_MEMBER = "metadata.json"
_MAX_JSON_BYTES = 256 * 2**20  # a B7 graph is ~0.8 MB
_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # signature ... name length, extra length: 30 bytes
_LOCAL_SIGNATURE = b"PK\x03\x04"
_ENCRYPTED = 0x1


@dataclass(frozen=True)
class WeightsRange:
    """Where the weights store lies: a byte range of `path` (the archive, or a temporary copy)."""

    path: Path
    start: int
    size: int | None
    label: str


class KerasArchive:
    """The archive's JSON members, parsed, and where its weights store lies (`weights`); a context manager."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._tmp: Path | None = None
        try:
            if not stat.S_ISREG(os.stat(self.path).st_mode):  # a FIFO would block open() for ever
                raise CheckpointError(f"{self.path} is not a regular file")
            with zipfile.ZipFile(self.path) as z:
                members = {i.filename: i for i in z.infolist()}
                self.members = list(members)
                self.config = self._json(z, members, CONFIG_MEMBER, required=True)
                self.metadata = self._json(z, members, METADATA_MEMBER, required=False) or {}
                self.weights = self._weights(z, members)
        except FileNotFoundError:
            raise CheckpointError(f"no such file: {self.path}") from None
        except zipfile.BadZipFile as e:
            raise CheckpointError(f"{self.path} is not a readable .keras archive (zip): {one_line(e)}") from None
        except OSError as e:
            raise CheckpointError(f"cannot read {self.path}: {one_line(e)}") from None
        except BaseException:
            self.close()
            raise

    def _json(self, z: zipfile.ZipFile, members: dict, name: str, required: bool):
        info = members.get(name)
        if info is None:
            if required:
                raise CheckpointError(
                    f"{self.path} has no {name}: not a Keras 3 model archive (it holds {', '.join(self.members)})"
                )
            return None
        if info.file_size > _MAX_JSON_BYTES:
            raise CheckpointError(f"{self.path}: {name} claims {info.file_size} bytes; refusing to read it")
        try:
            with z.open(info) as f:
                raw = f.read(_MAX_JSON_BYTES + 1)
            if len(raw) > _MAX_JSON_BYTES:
                raise CheckpointError(f"{self.path}: {name} is larger than it claims; refusing to read it")
            value = json.loads(raw)
        except (ValueError, zipfile.BadZipFile, RuntimeError) as e:  # RuntimeError: an encrypted member
            raise CheckpointError(f"{self.path}: {name} is not readable JSON: {one_line(e)}") from None
        if not isinstance(value, dict):
            raise CheckpointError(f"{self.path}: {name} is not a JSON object")
        return value

    def _weights(self, z: zipfile.ZipFile, members: dict) -> WeightsRange:
        info = members.get(WEIGHTS_MEMBER)
        label = f"{self.path}!{WEIGHTS_MEMBER}"
        if info is None:
            sharded = [m for m in self.members if m.endswith((".weights.json", ".npz"))]
            what = f" (it holds {', '.join(sharded)}: sharded or npz weights are not read)" if sharded else ""
            raise CheckpointError(f"{self.path} has no {WEIGHTS_MEMBER}{what}")
        if info.flag_bits & _ENCRYPTED:
            raise CheckpointError(f"{label} is encrypted")
        if info.compress_type == zipfile.ZIP_STORED:
            return WeightsRange(self.path, self._data_offset(info), info.file_size, label)
        # Compressed by another tool: stream it into a temporary file, checked by zipfile's CRC.
        fd, name = tempfile.mkstemp(prefix="effconv-", suffix=".weights.h5")
        self._tmp = Path(name)
        try:
            with os.fdopen(fd, "wb") as out, z.open(info) as member:
                shutil.copyfileobj(member, out, 1 << 20)
        except (zipfile.BadZipFile, OSError, RuntimeError, EOFError) as e:
            raise CheckpointError(f"cannot extract {label}: {one_line(e)}") from None
        return WeightsRange(self._tmp, 0, None, label)

    def _data_offset(self, info: zipfile.ZipInfo) -> int:
        """The first byte of a stored member's data, after its local header (whose lengths may differ from the
        directory's)."""
        with open(self.path, "rb") as f:
            f.seek(info.header_offset)
            header = f.read(_LOCAL_HEADER.size)
            size = os.fstat(f.fileno()).st_size
        if len(header) != _LOCAL_HEADER.size or header[:4] != _LOCAL_SIGNATURE:
            raise CheckpointError(f"{self.path}: the local header of {info.filename} is missing or corrupt")
        *_, name_length, extra_length = _LOCAL_HEADER.unpack(header)
        start = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
        if start + info.file_size > size:
            raise CheckpointError(f"{self.path}: {info.filename} runs past the end of the archive: it is truncated")
        return start

    @property
    def keras_version(self) -> str:
        return str(self.metadata.get("keras_version", "unknown"))

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None

    def __enter__(self) -> KerasArchive:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
