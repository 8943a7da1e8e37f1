"""effconv download of the new families' releases against a local mirror on 127.0.0.1: their official paths
(a folder per family, EdgeTPU at the top, EfficientNetV2's gzipped `.tgz`), the cache layout, and what
`effconv convert --src NAME` takes from the row (variant, image size)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from effconv.zoo import catalogue
from effconv.zoo.download import download, resolve_source
from tests.support.mirror_server import serve

FAST = {"backoff": 0.0, "timeout": 10.0}
NAMES = ("tf_efficientnet_lite0.in1k", "efficientnet-edgetpu-S", "tf_efficientnetv2_s.in21k")


def _gzipped_checkpoint(folder: str) -> bytes:
    """A gzipped tarball shaped like an official one: one folder with the checkpoint's index and data."""
    data = np.random.default_rng(7).integers(0, 256, 50_000, dtype=np.uint8).tobytes()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, content in (
            (f"{folder}/model.ckpt.index", b"index"),
            (f"{folder}/model.ckpt.data-00000-of-00001", data),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


@pytest.mark.parametrize("name", NAMES)
def test_release_downloads_to_its_official_path(name, tmp_path):
    entry = catalogue.get_entry(name)
    tarball = _gzipped_checkpoint(entry.stem.rsplit("/", 1)[-1])
    with serve({"/" + entry.file: tarball}) as mirror:
        got = download(entry, tmp_path, base_url=mirror.url, **FAST)
    assert got.archive == tmp_path / entry.file and got.archive.read_bytes() == tarball
    assert got.checkpoint_dir == tmp_path / entry.stem
    assert sorted(p.name for p in got.checkpoint_dir.iterdir()) == [
        "model.ckpt.data-00000-of-00001",
        "model.ckpt.index",
    ]
    source, variant, size = resolve_source(name, None, None, tmp_path)
    assert (variant, size) == (entry.variant, entry.image_size)
    assert Path(source) == got.checkpoint_dir


def test_the_official_paths_of_the_new_families():
    files = {name: catalogue.get_entry(name).file for name in NAMES}
    assert files == {
        "tf_efficientnet_lite0.in1k": "lite/efficientnet-lite0.tar.gz",
        "efficientnet-edgetpu-S": "efficientnet-edgetpu-S.tar.gz",
        "tf_efficientnetv2_s.in21k": "v2/efficientnetv2-s-21k.tgz",
    }
    entry = catalogue.get_entry("tf_efficientnetv2_s.in21k")
    assert (entry.stem, entry.variant, entry.image_size) == ("v2/efficientnetv2-s-21k", "in21k", 224)
