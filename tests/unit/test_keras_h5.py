"""The Keras .h5 reader on hostile but well-formed HDF5: what it refuses, what it reads, and its checking child.

Files are written with h5py in the Keras 2 `save_weights` layout (one `dense` layer), so no Keras is
needed; tests/robustness/test_fuzz.py covers corrupted bytes and files written by Keras itself.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from effconv.errors import CheckpointError
from effconv.formats import keras_h5
from effconv.formats.keras_h5 import KerasH5Reader

KERNEL = np.arange(20, dtype=np.float32).reshape(4, 5)


def keras_file(path, kernel=None):
    """A weights file with layer `dense`, weights `dense/kernel:0` (made by `kernel(group)`) and `dense/bias:0`."""
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [b"dense"]
        f.attrs["keras_version"] = b"2.15.0"
        layer = f.create_group("dense")
        layer.attrs["weight_names"] = [b"dense/kernel:0", b"dense/bias:0"]
        weights = layer.create_group("dense")
        weights["bias:0"] = np.zeros(5, np.float32)
        if kernel is None:
            weights["kernel:0"] = KERNEL
        else:
            kernel(f, weights)
    return path


def refused(path, needle: str) -> str:
    with pytest.raises(CheckpointError) as e:
        with KerasH5Reader(path) as reader:
            for name in reader.keys():
                reader.read(name)
    message = str(e.value)
    assert "\n" not in message and str(path) in message and needle in message, message
    return message


def test_plain_file_reads(tmp_path):
    with KerasH5Reader(keras_file(tmp_path / "w.h5")) as reader:
        assert reader.keys() == ["dense/kernel", "dense/bias"] and reader.keras_version == "2.15.0"
        assert reader.info("dense/kernel").nbytes == 80 and reader.info("dense/kernel").unsupported is None
        assert np.array_equal(reader.read("dense/kernel"), KERNEL)


def test_soft_link_inside_the_file_is_followed(tmp_path):
    def kernel(f, group):
        f["elsewhere"] = KERNEL
        group["kernel:0"] = h5py.SoftLink("/elsewhere")

    with KerasH5Reader(keras_file(tmp_path / "w.h5", kernel)) as reader:
        assert np.array_equal(reader.read("dense/kernel"), KERNEL)


def test_big_endian_weights_come_back_native(tmp_path):
    def kernel(f, group):
        group["kernel:0"] = KERNEL.astype(">f4")

    with KerasH5Reader(keras_file(tmp_path / "w.h5", kernel)) as reader:
        array = reader.read("dense/kernel")
    assert array.dtype == np.dtype("float32") and array.dtype.isnative and np.array_equal(array, KERNEL)


def test_soft_link_through_an_external_link_is_refused(tmp_path):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as o:
        o["w"] = KERNEL

    def kernel(f, group):
        f["ext"] = h5py.ExternalLink(str(other), "/w")
        group["kernel:0"] = h5py.SoftLink("/ext")

    refused(keras_file(tmp_path / "w.h5", kernel), "'dense/kernel' refers to data outside the file")


def test_virtual_dataset_is_refused(tmp_path):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as o:
        o["w"] = KERNEL

    def kernel(f, group):
        layout = h5py.VirtualLayout(shape=(4, 5), dtype="f4")
        layout[:] = h5py.VirtualSource(str(other), "w", shape=(4, 5))
        group.create_virtual_dataset("kernel:0", layout)

    refused(keras_file(tmp_path / "w.h5", kernel), "refers to data outside the file (virtual dataset)")


@pytest.mark.parametrize(
    "dtype", [np.dtype([("a", "<f4"), ("b", "<i4")]), np.dtype("c8"), np.dtype("S4"), h5py.string_dtype()]
)
def test_non_numeric_weights_are_refused(tmp_path, dtype):
    def kernel(f, group):
        group.create_dataset("kernel:0", shape=(4, 5), dtype=dtype)

    refused(keras_file(tmp_path / "w.h5", kernel), "weights are real numbers")


def test_soft_link_cycle_is_refused(tmp_path):
    def kernel(f, group):
        group["kernel:0"] = h5py.SoftLink("kernel:0")

    refused(keras_file(tmp_path / "w.h5", kernel), "cycle of soft links")


def test_dataset_that_stores_less_than_it_declares_is_refused(tmp_path):
    def kernel(f, group):
        group.create_dataset("kernel:0", shape=(4, 5), dtype="<f4")  # never written: no storage

    refused(keras_file(tmp_path / "w.h5", kernel), "declares 80 bytes but stores 0")


def test_crash_of_the_checking_child_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(keras_h5, "_PROBE_CODE", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    refused(keras_file(tmp_path / "w.h5"), "crashed the HDF5 library while being read (SIGSEGV)")


def test_hanging_checking_child_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(keras_h5, "_PROBE_CODE", "import time; time.sleep(30)")
    path = keras_file(tmp_path / "w.h5")
    with pytest.raises(CheckpointError, match="took over 0.5 s to read its structure"):
        keras_h5.check_in_child(path, timeout=0.5)
