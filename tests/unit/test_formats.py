"""The source-format registry: which format a path is, and that nothing outside it asks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from effconv import formats
from effconv.errors import UsageError
from tests.conftest import PROJECT_ROOT


def test_find_format_by_name_and_signature(tmp_path, fixture_ckpt):
    assert formats.find_format(fixture_ckpt).name == "tf-checkpoint"
    assert formats.find_format(tmp_path / "model.h5").name == "keras-h5"  # by name, even before it exists
    hdf5 = tmp_path / "weights.bin"
    hdf5.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(64))
    assert formats.find_format(hdf5).name == "keras-h5"  # by signature
    assert formats.find_format(tmp_path / "model.keras").name == "keras3-archive"  # Keras 3 (issue 13)
    assert formats.find_format(tmp_path / "model.weights.h5").name == "keras3-weights"


def test_get_format_and_names():
    names = [f.name for f in formats.FORMATS]
    assert names == ["keras3-archive", "keras3-weights", "keras3-saved-model", "keras-h5", "tf-checkpoint"]
    assert formats.FORMATS[-1].sniff(Path("anything"))
    assert formats.get_format("keras-h5").title == "Keras .h5"
    with pytest.raises(UsageError, match="unknown source format 'onnx'"):
        formats.get_format("onnx")


def test_local_files_are_known_before_opening(fixture_ckpt, tmp_path):
    files = formats.local_files(fixture_ckpt)
    assert [p.name for p in files] == ["model.ckpt.index", "model.ckpt.data-00000-of-00001"]
    assert formats.local_files(tmp_path / "missing") == ()
    assert formats.local_files(tmp_path / "x.keras") == ()


def test_open_source_gives_the_format_and_a_lazy_reader(fixture_ckpt):
    with formats.open_source(fixture_ckpt) as source:
        assert source.format is formats.get_format("tf-checkpoint")
        assert source.location.name == "model.ckpt" and len(source.reader.keys()) > 600
        detected = source.format.detect({k: source.reader.info(k).shape for k in source.reader.keys()})
    assert (detected.family, detected.arch, detected.num_classes) == ("efficientnet", "b0", 1000)
    assert detected.facts["prefix"] == "efficientnet-b0"


def test_no_format_branches_outside_the_registry():
    # convert, inspect, verify and the CLI ask the registry; only converter/formats/ names a format or reader.
    pattern = re.compile(r'"keras-h5"|"tf-checkpoint"|is_keras_source|TensorBundleReader|KerasH5Reader')
    offenders = [
        f"{path.relative_to(PROJECT_ROOT)}:{n}"
        for folder in ("converter", "models", "mappings")
        for path in (PROJECT_ROOT / folder).rglob("*.py")
        if "formats" not in path.relative_to(PROJECT_ROOT).parts
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line) and not line.lstrip().startswith(("#", '"', "`")) and "`" not in line
    ]
    assert offenders == []
