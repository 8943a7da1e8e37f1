"""Read Keras legacy HDF5 weight files lazily, with the interface of `TensorBundleReader`.

Two legacy layouts are read: weights-only files (`save_weights('x.h5')` in
Keras 2 / tf-keras, and Keras applications' own `efficientnetbN[_notop].h5`),
whose root lists `layer_names`, and full-model files (`model.save('x.h5')`, in
Keras 2 or 3), which hold the same under `model_weights` plus the graph as
`model_config`. Each layer group lists its `weight_names`. A tensor is keyed
`<layer>/<weight>` (the weight name's last part, without `:0`), e.g.
`stem_conv/kernel`. Opening reads only names, shapes and dtypes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CheckpointError, UsageError

__all__ = ["HDF5_SIGNATURE", "H5TensorInfo", "KerasH5Reader", "is_hdf5", "is_keras_source"]

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
KERAS_SUFFIXES = (".h5", ".hdf5")
SUPPORTED = (
    "legacy HDF5 weights (Keras applications' efficientnetbN.h5, Keras 2 save_weights('x.h5')) "
    "or a legacy HDF5 model (model.save('x.h5'))"
)


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
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _short_name(weight_name: str) -> str:
    return weight_name.rsplit("/", 1)[-1].split(":", 1)[0]


class KerasH5Reader:
    """Lazy reader of one Keras legacy .h5 file: `keys()`, `info(name)`, `read(name)`."""

    def __init__(self, path: str | os.PathLike) -> None:
        try:
            import h5py
        except ImportError as e:
            raise UsageError(f"reading Keras .h5 files needs h5py ({e}): pip install 'effconv[keras]'") from e
        self.path = Path(path)
        try:
            self._file = h5py.File(self.path, "r")
        except FileNotFoundError:
            raise CheckpointError(f"no such file: {self.path}") from None
        except OSError as e:
            raise CheckpointError(f"{self.path} is not a readable HDF5 file: {e}") from None
        try:
            self._infos = self._index()
        except BaseException:
            self._file.close()
            raise

    def _index(self) -> dict[str, H5TensorInfo]:
        f = self._file
        root = f["model_weights"] if "model_weights" in f else f
        self.saved_as = "model" if root is not f else "weights"
        if "layer_names" not in root.attrs:
            if "layers" in f or "vars" in f:
                raise CheckpointError(
                    f"{self.path} is a Keras 3 .weights.h5 file, whose weights are named by layer class "
                    f"and order, not by layer; effconv reads {SUPPORTED}. In Keras 3, model.save('x.h5') "
                    "writes the legacy layout"
                )
            raise CheckpointError(
                f"{self.path} is HDF5 but not a Keras weights file (no layer_names); expected {SUPPORTED}"
            )
        attrs = {**f.attrs, **root.attrs}
        self.keras_version = _text(attrs.get("keras_version", "unknown"))
        self.backend = _text(attrs.get("backend", "unknown"))
        infos: dict[str, H5TensorInfo] = {}
        for layer in (_text(n) for n in root.attrs["layer_names"]):
            group = root.get(layer)
            if group is None:
                raise CheckpointError(f"{self.path}: layer {layer!r} is listed but has no group")
            for weight in (_text(n) for n in group.attrs.get("weight_names", [])):
                dataset = group.get(weight)
                if dataset is None or not hasattr(dataset, "shape"):
                    raise CheckpointError(f"{self.path}: weight {weight!r} of layer {layer!r} is missing")
                key = f"{layer}/{_short_name(weight)}"
                if key in infos:
                    raise CheckpointError(f"{self.path}: layer {layer!r} holds two weights named {key!r}")
                infos[key] = H5TensorInfo(
                    name=key,
                    dtype=np.dtype(dataset.dtype),
                    shape=tuple(int(d) for d in dataset.shape),
                    dataset=dataset.name,
                    offset=dataset.id.get_offset() or 0,
                )
        return infos

    @property
    def model_config(self) -> dict | None:
        """The saved graph (full-model files only), parsed."""
        raw = self._file.attrs.get("model_config")
        if raw is None:
            return None
        try:
            return json.loads(_text(raw))
        except ValueError as e:
            raise CheckpointError(f"{self.path}: model_config is not JSON: {e}") from None

    def keys(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> H5TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise KeyError(f"no weight {name!r} in {self.path}") from None

    def read(self, name: str) -> np.ndarray:
        info = self.info(name)
        try:
            array = np.asarray(self._file[info.dataset][()])
        except OSError as e:
            raise CheckpointError(f"cannot read {name} from {self.path}: {e}") from None
        if array.shape != info.shape:
            raise CheckpointError(f"{name} in {self.path} has shape {array.shape}, not {info.shape}")
        return np.ascontiguousarray(array)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> KerasH5Reader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
