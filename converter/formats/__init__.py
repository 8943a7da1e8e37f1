"""Source formats behind one interface, and the registry that `convert`, `inspect`, `verify` and the CLI ask.

A source format knows how to recognise its files (`sniff`), open them as a lazy `Reader`
(names, shapes and dtypes without reading data; one tensor at a time), say what the files
hold (`detect`: family, arch, classes), build the conversion plan with the card's facts
(`plan`), describe itself for `effconv inspect`, and build the TensorFlow-side reference for
`effconv verify`. Adding a format is a module in this package and one row in `FORMATS`;
nothing outside this package asks which format a source is.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
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


# Suffixes of formats effconv recognises but does not read yet: refused with what it does read.
REFUSED_SUFFIXES: dict[str, str] = {
    ".keras": "is a Keras 3 .keras archive; effconv reads TF checkpoints and Keras legacy .h5 "
    "(Keras applications' efficientnetbN.h5, save_weights('x.h5') in Keras 2, model.save('x.h5'))",
}


def formats() -> tuple[SourceFormat, ...]:
    """The registry (the format modules import this one, so it is built on first use)."""
    from effconv.formats import keras, tf_checkpoint

    # Sniffed in order: the TF checkpoint (a directory, prefix, .index or tarball) takes what no other claims.
    return (keras.FORMAT, tf_checkpoint.FORMAT)


def get_format(name: str) -> SourceFormat:
    for fmt in formats():
        if fmt.name == name:
            return fmt
    raise UsageError(f"unknown source format {name!r}; effconv reads {', '.join(f.name for f in formats())}")


def find_format(src: str | os.PathLike) -> SourceFormat:
    """The format of `src`, by name and signature; anything unclaimed is tried as a TF checkpoint."""
    path = Path(src).expanduser()
    suffix = path.suffix.lower()
    if suffix in REFUSED_SUFFIXES:
        raise UsageError(f"{path} {REFUSED_SUFFIXES[suffix]}")
    *claimants, fallback = formats()
    return next((f for f in claimants if f.sniff(path)), fallback)


def local_files(src: str | os.PathLike) -> tuple[Path, ...]:
    """The source files of `src` to hash early (before heavy imports); () when unknown or unreadable."""
    path = Path(src).expanduser()
    try:
        return find_format(path).local_files(path)
    except (UsageError, OSError, ValueError):
        return ()


@contextlib.contextmanager
def open_source(src: str | os.PathLike) -> Iterator[OpenedSource]:
    """The opened source `src`, in whatever format it is."""
    path = Path(src).expanduser()
    with find_format(path).open(path) as source:
        yield source
