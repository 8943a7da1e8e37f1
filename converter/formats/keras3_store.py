"""Read a Keras 3 weights store (`model.weights.h5`, alone or inside a `.keras` archive) lazily.

Keras 3 keys a layer's weights by the layer's class and its place among the layers of that class
in its model, not by name: `layers/<snake_case class>[_<n>]/vars/<i>`, a nested model's layers under
its own `layers/<class>/layers/...`, and `<i>` the variable's position in the layer (kernel then bias,
gamma, beta, moving mean, moving variance, ...). Each `vars` group carries the layer's name as its
`name` attribute (Keras 3.6 and later); a layer without weights still has an empty `vars` group.

`Keras3WeightsStore` lists every `vars` group (`groups`) and reads one dataset at a time, keyed by its
path in the file (`layers/conv2d/vars/0`). Inside an archive it reads the stored zip member in place,
through a window on the archive file: nothing is extracted. Contiguous datasets (what Keras writes) are
read straight from the file into the caller's buffer.

The files are untrusted and parsed by libhdf5, which can crash the process on a corrupted one; as for
legacy .h5 files (`keras_h5`), a short child process walks the store first, and the store opens only
when the child survived.
"""

from __future__ import annotations

import io
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from effconv.errors import CheckpointError, EffconvError, UsageError, one_line
from effconv.formats.bundle import read_into
from effconv.formats.keras_h5 import PROBE_SECONDS, H5TensorInfo, H5Weights, probe_in_child

__all__ = ["Keras3WeightsStore", "NotKeras3", "VarsGroup", "is_keras3_layout", "probe", "snake_case"]

_PROBE_CODE = (
    "import sys; from effconv.formats.keras3_store import probe; "
    "probe(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if sys.argv[3] != '-' else None)"
)
_H5PY_ERRORS = (OSError, RuntimeError, KeyError, TypeError, ValueError, IndexError, OverflowError, MemoryError)
_NUMERIC_KINDS = "biuf"
_MAX_RANK = 32
_MAX_DEPTH = 64  # nested models deeper than this are a malformed file
_MAX_OBJECTS = 1_000_000


class NotKeras3(CheckpointError):
    """An HDF5 file that is not a Keras 3 weights store; `legacy`: it is a legacy Keras (.h5) one."""

    def __init__(self, message: str, legacy: bool):
        super().__init__(message)
        self.legacy = legacy


def snake_case(class_name: str) -> str:
    """The name Keras 3 gives a layer class in its weights files: `DepthwiseConv2D` -> `depthwise_conv2d`."""
    name = re.sub(r"\W+", "", class_name)
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


@dataclass
class VarsGroup:
    """One saveable's `vars` group: where it sits, the layer name it carries, its datasets by position."""

    path: str  # the saveable's path: "layers/functional/layers/conv2d" ("" for the model itself)
    name: str | None  # the `name` attribute (None in files written before Keras 3.6)
    datasets: list[str] = field(default_factory=list)  # dataset paths, by position (vars/0, vars/1, ...)

    @property
    def kind(self) -> str:
        """The snake-case class Keras keyed it by (`conv2d` for `layers/conv2d_3`)."""
        leaf = self.path.rsplit("/", 1)[-1]
        return re.sub(r"_\d+$", "", leaf)


def _import_h5py():
    try:
        import h5py
    except ImportError as e:
        raise UsageError(f"reading Keras weights files needs h5py ({e}): pip install 'effconv[keras]'") from e
    return h5py


def _read_at(f, offset: int, view: memoryview) -> int:
    """Fill `view` from `f` at `offset`; the bytes read (fewer only at the end of the file)."""
    f.seek(offset)
    return read_into(f, view)


class _Window(io.RawIOBase):
    """Bytes [start, start + size) of an open file, as a file of their own (what h5py reads a zip member through)."""

    def __init__(self, f, start: int, size: int):
        self._f, self._start, self._size, self._pos = f, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        want = max(0, min(len(view), self._size - self._pos))
        got = _read_at(self._f, self._start + self._pos, view[:want]) if want else 0
        self._pos += got
        return got

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos


def check_in_child(path: Path, start: int, size: int | None, timeout: float = PROBE_SECONDS) -> None:
    """Walk the store with `probe` in a child process first: a libhdf5 crash there is an error here."""
    probe_in_child(path, _PROBE_CODE, [os.fspath(path), str(start), "-" if size is None else str(size)], timeout)


def probe(path: str | os.PathLike, start: int = 0, size: int | None = None) -> None:
    """What the child runs: the store's own walk, where a crash of libhdf5 harms nobody."""
    try:
        with Keras3WeightsStore(path, start=start, size=size, isolate=False):
            pass
    except EffconvError:
        pass  # the parent repeats the walk and reports it


def is_keras3_layout(h5file) -> bool:
    """A Keras 3 store has `layers` or `vars` at its root and no legacy `layer_names` list."""
    if "layer_names" in h5file.attrs or "model_weights" in h5file:
        return False
    return h5file.get("layers", getlink=True) is not None or h5file.get("vars", getlink=True) is not None


class Keras3WeightsStore(H5Weights):
    """Lazy reader of a Keras 3 weights store: `keys()`, `info(key)`, `read(key, out)`, and its `groups`.

    `start`/`size`: the store is that byte range of `path` (a stored member of a .keras archive).
    `label` names the store in messages (`model.keras!model.weights.h5`).
    """

    checksummed = False

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        start: int = 0,
        size: int | None = None,
        isolate: bool = True,
        label: str | None = None,
    ) -> None:
        self._h5py = h5py = _import_h5py()
        self.path = Path(path)
        self.label = label or str(self.path)
        self._start = start
        self._raw = self._window = None
        try:
            if not stat.S_ISREG(os.stat(self.path).st_mode):  # a FIFO would block open() for ever
                raise CheckpointError(f"{self.path} is not a regular file")
            self._raw = open(self.path, "rb", buffering=0)  # noqa: SIM115 - closed by close()
        except FileNotFoundError:
            raise CheckpointError(f"no such file: {self.path}") from None
        except OSError as e:
            raise CheckpointError(f"cannot read {self.path}: {e.strerror}") from None
        self._file = None
        try:
            file_size = os.fstat(self._raw.fileno()).st_size
            self._size = file_size - start if size is None else size
            if start < 0 or self._size < 0 or start + self._size > file_size:
                raise CheckpointError(f"{self.label}: its bytes run past the end of {self.path}: it is truncated")
            if isolate:
                check_in_child(self.path, start, size)
            self._file = self._open(h5py)
            self._infos: dict[str, H5TensorInfo] = {}
            self._datasets: dict[str, object] = {}
            self._direct: dict[str, int] = {}  # key -> byte offset in the store, for contiguous datasets
            self.groups: list[VarsGroup] = []
            self._objects = 0
            self._walk(self._file, "", 0)
        except _H5PY_ERRORS as e:
            self.close()
            raise CheckpointError(f"{self.label} is a corrupt HDF5 file: {one_line(e, typed=True)}") from None
        except BaseException:
            self.close()
            raise

    def _open(self, h5py):
        try:
            if self._start == 0 and self._size == os.fstat(self._raw.fileno()).st_size:
                f = h5py.File(self.path, "r")
            else:  # h5py reads through its own handle: the window must not share the position of ours
                self._window = open(self.path, "rb", buffering=0)  # noqa: SIM115 - closed by close()
                f = h5py.File(io.BufferedReader(_Window(self._window, self._start, self._size), 1 << 16), "r")
        except _H5PY_ERRORS as e:
            raise CheckpointError(f"{self.label} is not a readable HDF5 file: {one_line(e, typed=True)}") from None
        if not is_keras3_layout(f):
            legacy = "layer_names" in f.attrs or "model_weights" in f
            f.close()
            what = "a legacy Keras .h5 file" if legacy else "no 'layers' or 'vars' group"
            raise NotKeras3(f"{self.label} is HDF5 but not a Keras 3 weights file ({what})", legacy)
        return f

    # --- the walk, checked ---------------------------------------------------------------------

    def _walk(self, group, path: str, depth: int) -> None:
        if depth > _MAX_DEPTH:
            raise CheckpointError(f"{self.label}: models nested deeper than {_MAX_DEPTH} levels")
        for name in group:
            self._objects += 1
            if self._objects > _MAX_OBJECTS:
                raise CheckpointError(f"{self.label}: more than {_MAX_OBJECTS} objects; not a Keras weights file")
            link = group.get(name, getlink=True)
            if not isinstance(link, self._h5py.HardLink):
                raise CheckpointError(f"{self.label}: '{path}{name}' is a link; Keras writes none")
            child = group[name]
            where = f"{path}{name}"
            if isinstance(child, self._h5py.Dataset):
                self._add(where, child)
            elif name == "vars":
                self._vars(child, path.rstrip("/"))
            else:
                self._walk(child, f"{where}/", depth + 1)

    def _vars(self, group, owner: str) -> None:
        raw = group.attrs.get("name")
        name = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else (str(raw) if raw is not None else None)
        entry = VarsGroup(owner, name)
        members = list(group)
        if any(not m.isdigit() for m in members):
            raise CheckpointError(f"{self.label}: '{owner}/vars' holds {members}, not numbered variables")
        for member in sorted(members, key=int):
            if not isinstance(group.get(member, getlink=True), self._h5py.HardLink):
                raise CheckpointError(f"{self.label}: '{owner}/vars/{member}' is a link; Keras writes none")
            dataset = group[member]
            if not isinstance(dataset, self._h5py.Dataset):
                raise CheckpointError(f"{self.label}: '{owner}/vars/{member}' is not a dataset")
            key = f"{owner}/vars/{member}" if owner else f"vars/{member}"
            self._add(key, dataset)
            entry.datasets.append(key)
        self.groups.append(entry)

    def _add(self, key: str, dataset) -> None:
        h5d = self._h5py.h5d
        plist = dataset.id.get_create_plist()
        layout = plist.get_layout()
        if layout == h5d.VIRTUAL or plist.get_external_count() > 0:
            raise CheckpointError(f"{self.label}: weight {key!r} refers to data outside the file")
        if layout not in (h5d.CONTIGUOUS, h5d.CHUNKED, h5d.COMPACT):
            raise CheckpointError(f"{self.label}: weight {key!r} has an unknown HDF5 storage layout {layout}")
        dtype = np.dtype(dataset.dtype)
        if dtype.kind not in _NUMERIC_KINDS:
            raise CheckpointError(f"{self.label}: weight {key!r} has dtype {dtype}; weights are real numbers")
        if dataset.shape is None or len(dataset.shape) > _MAX_RANK:
            raise CheckpointError(f"{self.label}: weight {key!r} has no shape or more than {_MAX_RANK} dimensions")
        shape = tuple(int(d) for d in dataset.shape)
        nbytes = math.prod(shape) * dtype.itemsize
        offset = dataset.id.get_offset()
        if nbytes > self._size or (offset is not None and offset + nbytes > self._size):
            raise CheckpointError(f"{self.label}: weight {key!r} runs past the end of the file: it is truncated")
        filtered = plist.get_nfilters() > 0
        stored = dataset.id.get_storage_size()
        if not filtered and stored < nbytes:
            raise CheckpointError(f"{self.label}: weight {key!r} declares {nbytes} bytes but stores {stored}")
        if layout == h5d.CONTIGUOUS and offset is not None and not filtered:
            self._direct[key] = offset
        self._datasets[key] = dataset
        native = dtype.newbyteorder("=")
        self._infos[key] = H5TensorInfo(key, native, shape, key, self._start + (offset or 0))

    # --- reading (the interface is `H5Weights`') ------------------------------------------------

    def _read(self, name: str, info: H5TensorInfo, buffer: np.ndarray | None) -> np.ndarray:
        """A contiguous dataset straight from the file into `buffer` (or a fresh one); any other through h5py."""
        if name not in self._direct:
            return super()._read(name, info, buffer)
        if buffer is None:
            buffer = np.empty(info.nbytes, np.uint8)
        got = _read_at(self._raw, self._start + self._direct[name], memoryview(buffer)) if info.nbytes else 0
        if got != info.nbytes:
            raise CheckpointError(f"{self.label}: weight {name!r} is truncated ({got} of {info.nbytes} bytes)")
        stored = np.dtype(self._datasets[name].dtype)
        array = buffer.view(stored).reshape(info.shape)
        if stored != info.dtype:  # a big-endian file: numbers in native order, in place
            array = array.byteswap(inplace=True).view(info.dtype)
        return array

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except _H5PY_ERRORS:
                pass
            self._file = None
        for handle in (self._window, self._raw):
            if handle is not None:
                handle.close()
        self._window = self._raw = None
