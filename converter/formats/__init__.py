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
from collections.abc import Iterator
from pathlib import Path

from effconv.errors import UsageError
from effconv.formats import keras, keras3, saved_model, tf_checkpoint
from effconv.formats.base import Detected, OpenedSource, Reader, SourceFormat, SourcePlan, TensorInfo

__all__ = [
    "FORMATS",
    "Detected",
    "OpenedSource",
    "Reader",
    "SourceFormat",
    "SourcePlan",
    "TensorInfo",
    "find_format",
    "get_format",
    "local_files",
    "open_source",
]

# Suffixes of formats effconv recognises but does not read yet: refused with what it does read.
REFUSED_SUFFIXES: dict[str, str] = {}


# The registry. Sniffed in order: Keras 3's `.keras` and `.weights.h5` before the legacy `.h5` that claims any
# HDF5 file; a SavedModel directory before the TF checkpoint (a directory, prefix, .index or tarball), which
# takes what no other claims, so it comes last.
FORMATS: tuple[SourceFormat, ...] = (
    keras3.ARCHIVE,
    keras3.WEIGHTS,
    saved_model.FORMAT,
    keras.FORMAT,
    tf_checkpoint.FORMAT,
)


def get_format(name: str) -> SourceFormat:
    for fmt in FORMATS:
        if fmt.name == name:
            return fmt
    raise UsageError(f"unknown source format {name!r}; effconv reads {', '.join(f.name for f in FORMATS)}")


def find_format(src: str | os.PathLike) -> SourceFormat:
    """The format of `src`, by name and signature; anything unclaimed is tried as a TF checkpoint."""
    path = Path(src).expanduser()
    suffix = path.suffix.lower()
    if suffix in REFUSED_SUFFIXES:
        raise UsageError(f"{path} {REFUSED_SUFFIXES[suffix]}")
    *claimants, fallback = FORMATS
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
