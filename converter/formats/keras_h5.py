"""Read Keras legacy HDF5 weight files lazily, with the interface of `TensorBundleReader`.

Two legacy layouts are read: weights-only files (`save_weights('x.h5')` in
Keras 2 / tf-keras, and Keras applications' own `efficientnetbN[_notop].h5`),
whose root lists `layer_names`, and full-model files (`model.save('x.h5')`, in
Keras 2 or 3), which hold the same under `model_weights` plus the graph as
`model_config`. Each layer group lists its `weight_names`. A tensor is keyed
`<layer>/<weight>` (the weight name's last part, without `:0`), e.g.
`stem_conv/kernel`. Opening reads only names, shapes and dtypes.

The files are untrusted and parsed by libhdf5, which can crash the process on a
corrupted one. So a short child process first walks the file as the reader
will (`probe`: every group, attribute, dataset header and chunk index the reader
touches, but not the weights' bytes), and the reader opens the file only when
the child survived. Weights must be numbers stored in the file itself (no
external links, external raw storage or virtual datasets), and none may declare
more bytes than the file holds.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from effconv.errors import CheckpointError, EffconvError, UsageError, one_line
from effconv.formats.base import reused_buffer

__all__ = [
    "HDF5_SIGNATURE",
    "H5TensorInfo",
    "H5Weights",
    "KerasH5Reader",
    "check_in_child",
    "is_hdf5",
    "is_keras_source",
    "probe",
]

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
KERAS_SUFFIXES = (".h5", ".hdf5")
SUPPORTED = (
    "legacy HDF5 weights (Keras applications' efficientnetbN.h5, Keras 2 save_weights('x.h5')) "
    "or a legacy HDF5 model (model.save('x.h5'))"
)
PROBE_SECONDS = 60  # the child's walk of an honest file takes a fraction of a second
_PROBE_CODE = "import sys; from effconv.formats.keras_h5 import probe; probe(sys.argv[1])"
# What h5py raises from a corrupted file (MemoryError: a size field that lies).
_H5PY_ERRORS = (OSError, RuntimeError, KeyError, TypeError, ValueError, IndexError, OverflowError, MemoryError)
_NUMERIC_KINDS = "biuf"  # bool, int, uint, float: what a layer's weights may be
_MAX_RANK = 32
_MAX_SOFT_LINKS = 16  # soft links followed for one name: more is a cycle


def is_hdf5(path: Path) -> bool:
    """True for an HDF5 file (by its signature, at offset 0 as Keras writes them)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE
    except OSError:
        return False


def is_keras_source(src: str | os.PathLike) -> bool:
    """A Keras .h5 by its name, or any HDF5 file (TF checkpoints are never HDF5)."""
    path = Path(src).expanduser()
    return path.suffix.lower() in KERAS_SUFFIXES or (path.is_file() and is_hdf5(path))


@dataclass(frozen=True)
class H5TensorInfo:
    """One weight: what it is and where it lives in the file."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    dataset: str  # the HDF5 path
    offset: int  # byte offset in the file (0 when chunked): reads go in file order
    shard: int = 0

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def dtype_name(self) -> str:
        return str(self.dtype)

    @property
    def unsupported(self) -> str | None:
        return None  # a weight read() would refuse is refused when the file opens


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _short_name(weight_name: str) -> str:
    return weight_name.rsplit("/", 1)[-1].split(":", 1)[0]


def _import_h5py():
    try:
        import h5py
    except ImportError as e:
        raise UsageError(f"reading Keras .h5 files needs h5py ({e}): pip install 'effconv[keras]'") from e
    return h5py


def check_in_child(path: Path, timeout: float = PROBE_SECONDS) -> None:
    """Walk `path` with `probe` in a child process first: a libhdf5 crash there is an error here."""
    probe_in_child(path, _PROBE_CODE, [os.fspath(path)], timeout)


def probe_in_child(path: Path, code: str, args: list[str], timeout: float = PROBE_SECONDS) -> None:
    """Run `code` (a walk of the HDF5 file `path`) with `args` in a child Python: its crash, hang or error is ours."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # find effconv as we did
    try:
        child = subprocess.run(
            [sys.executable, "-c", code, *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        raise CheckpointError(f"{path} took over {timeout:g} s to read its structure: the file is corrupt") from None
    if child.returncode < 0:
        try:
            why = signal.Signals(-child.returncode).name
        except ValueError:
            why = f"signal {-child.returncode}"
        raise CheckpointError(f"{path} crashed the HDF5 library while being read ({why}): the file is corrupt")
    if child.returncode != 0:
        last = (child.stderr.decode(errors="replace").strip().splitlines() or ["no message"])[-1]
        raise CheckpointError(f"{path} could not be checked in a separate process: {last}")


def probe(path: str | os.PathLike) -> None:
    """What the child runs: the reader's own walk of the file, where a crash of libhdf5 harms nobody.

    Errors the reader reports are left for the parent, which repeats the walk and reports them.
    """
    try:
        with KerasH5Reader(path, isolate=False) as reader:
            _ = reader.model_config
    except EffconvError:
        pass


_Weights = TypeVar("_Weights", bound="H5Weights")


class H5Weights:
    """The reader interface of an indexed HDF5 weights file: `keys()`, `info(name)`, `read(name, out)`.

    Shared by this legacy reader and Keras 3's store (`keras3_store`): a subclass indexes its file into
    `_infos` and `_datasets` (key -> h5py dataset), names it in messages by `label`, and provides `close()`.
    """

    label: str
    _infos: dict[str, H5TensorInfo]
    _datasets: dict[str, object]

    def keys(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> H5TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise KeyError(f"no weight {name!r} in {self.label}") from None

    def read(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        """One weight as an array: fresh, or a view into the front of `out` (a reused uint8 buffer)."""
        info = self.info(name)
        return self._read(name, info, reused_buffer(out, info.nbytes))

    def _read(self, name: str, info: H5TensorInfo, buffer: np.ndarray | None) -> np.ndarray:
        """The weight through h5py (any storage layout), into `buffer` when there is one."""
        try:
            array = np.asarray(self._datasets[name][()]).astype(info.dtype, copy=False)
        except _H5PY_ERRORS as e:
            raise CheckpointError(f"cannot read {name} from {self.label}: {one_line(e, typed=True)}") from None
        if array.shape != info.shape:
            raise CheckpointError(f"{name} in {self.label} has shape {array.shape}, not {info.shape}")
        if buffer is None:
            return np.ascontiguousarray(array)
        view = buffer.view(info.dtype).reshape(info.shape)
        np.copyto(view, array)
        return view

    def __enter__(self: _Weights) -> _Weights:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class KerasH5Reader(H5Weights):
    """Lazy reader of one Keras legacy .h5 file: `keys()`, `info(name)`, `read(name)`.

    `isolate=False` skips the check in a child process; only `probe` (the child) uses it.
    """

    def __init__(self, path: str | os.PathLike, *, isolate: bool = True) -> None:
        self._h5py = h5py = _import_h5py()
        self.path = Path(path)
        self.label = str(self.path)
        if not self.path.exists():
            raise CheckpointError(f"no such file: {self.path}")
        if isolate:
            check_in_child(self.path)
        try:
            self._file = h5py.File(self.path, "r")
        except FileNotFoundError:
            raise CheckpointError(f"no such file: {self.path}") from None
        except _H5PY_ERRORS as e:
            raise CheckpointError(f"{self.path} is not a readable HDF5 file: {one_line(e, typed=True)}") from None
        self._datasets: dict[str, object] = {}
        try:
            self._file_size = os.stat(self.path).st_size
            self._infos = self._index()
        except _H5PY_ERRORS as e:
            self._close_quietly()
            raise CheckpointError(f"{self.path} is a corrupt HDF5 file: {one_line(e, typed=True)}") from None
        except BaseException:
            self._close_quietly()
            raise

    def _index(self) -> dict[str, H5TensorInfo]:
        f = self._file
        weights = self._member(f, "model_weights", "model_weights")
        root = weights if weights is not None else f
        self.saved_as = "model" if weights is not None else "weights"
        if not self._is_group(root):
            raise CheckpointError(f"{self.path}: model_weights is not a group")
        if "layer_names" not in root.attrs:
            if f.get("layers", getlink=True) is not None or f.get("vars", getlink=True) is not None:
                raise CheckpointError(
                    f"{self.path} is a Keras 3 .weights.h5 file, whose weights are named by layer class "
                    f"and order, not by layer; effconv reads {SUPPORTED}. In Keras 3, model.save('x.h5') "
                    "writes the legacy layout"
                )
            raise CheckpointError(
                f"{self.path} is HDF5 but not a Keras weights file (no layer_names); expected {SUPPORTED}"
            )
        self.keras_version = self._version(root, f, "keras_version")
        self.backend = self._version(root, f, "backend")
        infos: dict[str, H5TensorInfo] = {}
        for layer in self._names(root, "layer_names", "the file"):
            group = self._member(root, layer, f"layer {layer!r}")
            if group is None or not self._is_group(group):
                raise CheckpointError(f"{self.path}: layer {layer!r} is listed but has no group")
            for weight in self._names(group, "weight_names", f"layer {layer!r}"):
                key = f"{layer}/{_short_name(weight)}"
                if key in infos:
                    raise CheckpointError(f"{self.path}: layer {layer!r} holds two weights named {key!r}")
                infos[key] = self._weight_info(key, self._member(group, weight, f"weight {key!r}"))
        return infos

    # --- the structure, checked as it is walked ---------------------------------------------

    def _is_group(self, obj) -> bool:
        return isinstance(obj, self._h5py.Group)

    def _names(self, group, attribute: str, owner: str) -> list[str]:
        """A list of names stored as an attribute (empty when absent)."""
        if attribute not in group.attrs:
            return []
        value = np.asarray(group.attrs[attribute])
        if value.size == 0:
            return []
        if value.ndim != 1 or value.dtype.kind not in "SUO":
            raise CheckpointError(f"{self.path}: the {attribute} of {owner} is not a list of names")
        return [_text(v) for v in value]

    def _version(self, root, f, attribute: str) -> str:
        for where in (root, f):
            if attribute in where.attrs:
                return _text(where.attrs[attribute])
        return "unknown"

    def _member(self, group, name: str, what: str, hops: int = 0):
        """The object at `name` under `group` (None if absent), reached without leaving the file.

        Soft links are resolved here, component by component, so that an external link
        anywhere on the way is refused before libhdf5 opens the other file.
        """
        h5py = self._h5py
        obj = self._file if name.startswith("/") else group
        for part in name.split("/"):
            if part in ("", "."):
                continue
            if not self._is_group(obj):
                return None
            link = obj.get(part, getlink=True)
            if link is None:
                return None
            if isinstance(link, h5py.SoftLink):
                if hops >= _MAX_SOFT_LINKS:
                    raise CheckpointError(f"{self.path}: {what} is reached through a cycle of soft links")
                obj = self._member(obj, link.path, what, hops + 1)
            elif isinstance(link, h5py.HardLink):
                obj = obj.get(part)
            else:
                raise CheckpointError(f"{self.path}: {what} refers to data outside the file (an external link)")
        return obj

    def _weight_info(self, key: str, dataset) -> H5TensorInfo:
        """The weight's info, once its storage, dtype and size pass; before any of its data is read."""
        if not isinstance(dataset, self._h5py.Dataset):
            raise CheckpointError(f"{self.path}: weight {key!r} is missing")
        self._check_storage(key, dataset)
        dtype = np.dtype(dataset.dtype)
        if dtype.kind not in _NUMERIC_KINDS:
            raise CheckpointError(f"{self.path}: weight {key!r} has dtype {dtype}; weights are real numbers")
        dtype = dtype.newbyteorder("=")  # read() returns native byte order, as torch needs
        if dataset.shape is None or len(dataset.shape) > _MAX_RANK:
            raise CheckpointError(f"{self.path}: weight {key!r} has no shape or more than {_MAX_RANK} dimensions")
        shape = tuple(int(d) for d in dataset.shape)
        offset = dataset.id.get_offset()
        self._check_size(key, dataset, math.prod(shape) * dtype.itemsize, offset)
        self._datasets[key] = dataset
        return H5TensorInfo(name=key, dtype=dtype, shape=shape, dataset=dataset.name or key, offset=offset or 0)

    def _check_storage(self, key: str, dataset) -> None:
        """Only data inside this file: no external raw files, no virtual datasets."""
        h5d = self._h5py.h5d
        plist = dataset.id.get_create_plist()
        layout = plist.get_layout()
        if layout == h5d.VIRTUAL or plist.get_external_count() > 0:
            kind = "virtual dataset" if layout == h5d.VIRTUAL else "external storage"
            raise CheckpointError(f"{self.path}: weight {key!r} refers to data outside the file ({kind})")
        if layout not in (h5d.CONTIGUOUS, h5d.CHUNKED, h5d.COMPACT):
            raise CheckpointError(f"{self.path}: weight {key!r} has an unknown HDF5 storage layout {layout}")

    def _check_size(self, key: str, dataset, nbytes: int, offset: int | None) -> None:
        """The declared size must fit the real file: a lie would size a huge allocation."""
        if nbytes > self._file_size:
            raise CheckpointError(
                f"{self.path}: weight {key!r} declares {nbytes} bytes, more than the file's {self._file_size}"
            )
        if offset is not None and offset + nbytes > self._file_size:
            raise CheckpointError(f"{self.path}: weight {key!r} runs past the end of the file: it is truncated")
        stored = dataset.id.get_storage_size()
        if dataset.id.get_create_plist().get_nfilters() == 0 and stored < nbytes:
            raise CheckpointError(f"{self.path}: weight {key!r} declares {nbytes} bytes but stores {stored}")

    # --- the interface ------------------------------------------------------------------------

    @property
    def model_config(self) -> dict | None:
        """The saved graph (full-model files only), parsed."""
        try:
            raw = self._file.attrs.get("model_config")
        except _H5PY_ERRORS as e:
            raise CheckpointError(f"{self.path}: cannot read model_config: {one_line(e, typed=True)}") from None
        if raw is None:
            return None
        try:
            return json.loads(_text(raw))
        except ValueError as e:
            raise CheckpointError(f"{self.path}: model_config is not JSON: {one_line(e, typed=True)}") from None

    def close(self) -> None:
        self._datasets.clear()
        self._file.close()

    def _close_quietly(self) -> None:
        try:
            self.close()
        except _H5PY_ERRORS:
            pass
