"""What every source format provides: the `SourceFormat` protocol, the lazy `Reader` protocol, and the records
a format hands to the rest of the flow (`OpenedSource`, `Detected`, `SourcePlan`)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from effconv.errors import UsageError

if TYPE_CHECKING:
    from effconv.ema_policy import EmaChoice
    from effconv.mappings.engine import TensorMapping
    from effconv.mappings.tables import SourceTable


class TensorInfo(Protocol):
    """What a reader says of one tensor before reading it."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    shard: int
    offset: int

    @property
    def nbytes(self) -> int: ...
    @property
    def dtype_name(self) -> str: ...
    @property
    def unsupported(self) -> str | None: ...


class Reader(Protocol):
    """A lazy reader: open cheaply, list, read one tensor at a time (into `out`, a reused uint8 buffer)."""

    def keys(self) -> list[str]: ...
    def info(self, name: str) -> TensorInfo: ...
    def read(self, name: str, out: np.ndarray | None = None) -> np.ndarray: ...


def reused_buffer(out: np.ndarray | None, nbytes: int) -> np.ndarray | None:
    """The front `nbytes` of `out`, the buffer a caller of `Reader.read` reuses (None without one), once checked."""
    if out is None:
        return None
    if out.dtype != np.uint8 or out.ndim != 1 or not out.flags.c_contiguous or out.size < nbytes:
        raise UsageError(f"read(out=...) needs a contiguous uint8 buffer of at least {nbytes} bytes")
    return out[:nbytes]


@dataclass(frozen=True)
class OpenedSource:
    """An opened source: its reader and files, and where TensorFlow or Keras would open it."""

    format: SourceFormat
    reader: Reader
    files: tuple[Path, ...]  # hashed into the card
    origin: Path  # what the user passed
    location: Path  # what the format's own tools open (a checkpoint prefix, the .h5 file)


@dataclass(frozen=True)
class Detected:
    """What a source holds: the model (family and arch), its classes, and the format's own facts."""

    family: str
    arch: str
    num_classes: int
    num_blocks: int
    stem_channels: int
    head_channels: int
    facts: Mapping[str, Any] = field(default_factory=dict)  # prefix, bn scope, depthwise name, ...

    @classmethod
    def of(cls, arch: str, num_classes: int, blocks: int, stem: int, head: int, **facts: Any) -> Detected:
        """What a source holds, its family read off the architecture table."""
        from effconv.models import spec

        return cls(spec.get_arch(arch).family, arch, num_classes, blocks, stem, head, facts)


@dataclass
class SourcePlan:
    """A format's part of a conversion: the plan, which key each row reads, the card's facts."""

    detected: Detected
    plan: tuple[TensorMapping, ...]
    choice: EmaChoice
    table: SourceTable  # for the reasons of unused variables
    card: dict  # weights, weights_policy, mixed_variables, source facts, [input_normalization]
    mean_std: tuple[list[float], list[float]] | None = None  # an input normalisation the source itself carries


class SourceFormat(Protocol):
    name: str  # as recorded in the card's source.format
    title: str  # in messages

    def sniff(self, path: Path) -> bool:
        """Whether `path` is in this format (cheap: names and signatures only)."""

    def local_files(self, path: Path) -> tuple[Path, ...]:
        """The files to hash, when known without opening anything; () otherwise."""

    def open(self, path: Path) -> contextlib.AbstractContextManager[OpenedSource]: ...

    def detect(self, shapes: Mapping[str, tuple[int, ...]], arch: str | None = None) -> Detected:
        """Family, arch and classes from names and shapes; `arch`, when given, must agree."""

    def plan(
        self, source: OpenedSource, shapes: Mapping[str, tuple[int, ...]], arch: str | None, ema: str, allow_mixed: bool
    ) -> SourcePlan: ...

    def inspect(self, source: OpenedSource, infos: Mapping[str, TensorInfo]) -> dict:
        """The format's own fields of `effconv inspect`'s report (raises an EffconvError when unrecognised)."""

    def describe(self, report: dict) -> list[str]:
        """The human-readable lines of those fields."""

    def tf_reference(self, source: OpenedSource, arch: str, ema: str, allow_mixed: bool, say):
        """(reference model, Detected, EmaChoice) for `effconv verify`: the source run by its own framework."""
