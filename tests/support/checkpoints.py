"""Copies of a TF checkpoint with chosen tensors given new values, their crc32c made to match (valid files)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from effconv.formats import bundle
from effconv.formats.bundle import TensorBundleReader
from tests.unit.test_bundle import entry_proto, header_proto, write_index

_TF_DTYPE = {name: number for number, (name, _) in bundle._DTYPES.items()}
DATA = "model.ckpt.data-00000-of-00001"


def with_values(src_ckpt: Path, dest: Path, changes: dict[str, np.ndarray]) -> Path:
    """`dest`, a copy of the one-shard checkpoint folder `src_ckpt` whose tensors in `changes` hold new values.

    Each new array keeps the tensor's shape, dtype and place in the data file; the index is written again
    with every tensor's crc32c, so that the copy is a valid checkpoint, only with other numbers in it.
    """
    dest.mkdir(parents=True)
    shutil.copyfile(src_ckpt / DATA, dest / DATA)
    items = [(b"", header_proto())]
    with TensorBundleReader(src_ckpt / "model.ckpt") as reader, open(dest / DATA, "r+b") as data:
        for info in reader.infos():
            array = changes.get(info.name, reader.read(info.name))
            assert array.shape == info.shape and array.dtype == info.dtype, info.name
            data.seek(info.offset)
            data.write(np.ascontiguousarray(array).tobytes())
            items.append((info.name.encode(), entry_proto(array, info.offset, dtype=_TF_DTYPE[info.dtype_name])))
    write_index(dest / "model.ckpt.index", items)
    return dest


def read_tensor(ckpt: Path, name: str) -> np.ndarray:
    with TensorBundleReader(ckpt / "model.ckpt") as reader:
        return reader.read(name).copy()
