"""The stored-zip writer: valid archives (CRCs, zip64) that torch.load and Python's zipfile read."""

from __future__ import annotations

import zipfile
import zlib

import numpy as np
import pytest
import torch

from effconv.output import zipstore
from effconv.output.streaming_save import StreamingStateDictWriter


def _write(path, entries: dict[str, bytes], alignment: int = 64) -> None:
    with open(path, "wb") as f:
        z = zipstore.StoredZipWriter(f, alignment)
        for name, data in entries.items():
            z.add(name, data)
        z.close()


@pytest.mark.parametrize("small_limits", [False, True])
def test_archive_reads_back_with_right_crcs_and_aligned_data(tmp_path, monkeypatch, small_limits):
    if small_limits:  # every entry, offset and the count take the zip64 paths
        monkeypatch.setattr(zipstore, "ZIP64_LIMIT", 100)
        monkeypatch.setattr(zipstore, "MAX_ENTRIES", 3)
    rng = np.random.default_rng(0)
    entries = {f"a/{i}": rng.bytes(n) for i, n in enumerate([0, 1, 99, 100, 101, 5000])}
    path = tmp_path / "x.zip"
    _write(path, entries)
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None
        assert z.namelist() == list(entries)
        for info in z.infolist():
            assert info.compress_type == zipfile.ZIP_STORED and info.CRC == zlib.crc32(entries[info.filename])
            assert z.read(info) == entries[info.filename]
            name_len, extra_len = np.frombuffer(raw[info.header_offset + 26 : info.header_offset + 30], "<u2")
            start = info.header_offset + 30 + name_len + extra_len
            assert start % 64 == 0 and raw[start : start + info.file_size] == entries[info.filename]


def test_duplicate_entry_refused(tmp_path):
    with open(tmp_path / "x.zip", "wb") as f:
        z = zipstore.StoredZipWriter(f)
        z.add("a", b"1")
        with pytest.raises(ValueError, match="twice"):
            z.add("a", b"2")


@pytest.mark.parametrize("mmap", [False, True])
def test_torch_reads_the_zip64_paths(tmp_path, monkeypatch, mmap):
    monkeypatch.setattr(zipstore, "ZIP64_LIMIT", 200)
    monkeypatch.setattr(zipstore, "MAX_ENTRIES", 4)
    state = {f"t{i}": torch.randn(10 * i + 1, generator=torch.Generator().manual_seed(i)) for i in range(8)}
    path = tmp_path / "s.pth"
    with StreamingStateDictWriter(path) as w:
        for name, tensor in state.items():
            w.add(name, tensor)
    loaded = torch.load(path, weights_only=True, mmap=mmap)
    assert list(loaded) == list(state) and all(torch.equal(loaded[k], v) for k, v in state.items())


def test_same_weights_give_the_same_bytes_but_for_the_serialization_id(tmp_path):
    state = {"a": torch.arange(10.0), "b": torch.ones(3, 3)}
    paths = [tmp_path / "1.pth", tmp_path / "2.pth"]
    for path in paths:
        with StreamingStateDictWriter(path) as w:
            for name, tensor in state.items():
                w.add(name, tensor)
    with zipfile.ZipFile(paths[0]) as a, zipfile.ZipFile(paths[1]) as b:
        differ = [n for n in a.namelist() if a.read(n) != b.read(n)]
    assert differ == ["archive/.data/serialization_id"]
