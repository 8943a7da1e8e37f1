"""The card's preprocessing pipelines: the CPU path and the torch path (`--resize-on-device`) give the same bits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from effconv.errors import UsageError
from effconv.zoo import pipelines
from effconv.zoo.against_tf import TF_PIPELINES

TF1 = {"image_size": 60, "mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]}
SETTINGS = {
    "tf1 (no interpolation named: effconv 0.1 cards)": TF1,
    "tf1 advprop": {**TF1, "interpolation": "bicubic-tf1-legacy", "mean": [127.5] * 3, "std": [127.5] * 3},
    "tf2 centre crop, floor": {
        **TF1,
        "interpolation": "bilinear-tf2",
        "crop": "center",
        "crop_offset": "floor",
        "crop_padding": 32,
    },
    "tf2 no crop": {
        "image_size": 71,
        "mean": [128.0] * 3,
        "std": [128.0] * 3,
        "interpolation": "bilinear-tf2",
        "crop": "none",
    },  # fmt: skip
}


@pytest.mark.parametrize("name", SETTINGS)
@pytest.mark.parametrize("shape", [(75, 100, 3), (41, 33, 3), (200, 150, 3)])
def test_torch_path_equals_the_cpu_path_bit_for_bit(name, shape):
    settings = SETTINGS[name]
    image = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    on_cpu = pipelines.prepare(image, settings)
    size = settings["image_size"]
    assert on_cpu.shape == (3, size, size) and on_cpu.dtype == np.float32 and on_cpu.flags.c_contiguous
    crop = pipelines.crop(image, settings)
    assert crop.dtype == np.uint8 and crop.flags.c_contiguous
    on_torch = pipelines.prepare_on_device(torch.from_numpy(crop), settings)
    assert on_torch.dtype == torch.float32 and on_torch.is_contiguous()
    assert np.array_equal(on_torch.numpy().view(np.uint32), on_cpu.view(np.uint32)), name


def test_the_pipelines_differ_where_the_cards_differ():
    """A test that could not tell the recipes apart would pass whatever the table held."""
    image = np.random.default_rng(3).integers(0, 256, (75, 100, 3), dtype=np.uint8)
    outputs = [pipelines.prepare(image, SETTINGS[name]) for name in list(SETTINGS)[::2]]
    assert not np.array_equal(outputs[0], outputs[1])
    tf1_crop = pipelines.crop(image, TF1)
    assert tf1_crop.shape == (48, 48, 3)  # int(60 / 92 * 75): the TPU repo's side
    assert np.array_equal(tf1_crop, image[14:62, 26:74])  # odd margin pixel top/left


def test_unknown_or_inconsistent_cards_are_refused():
    image = np.zeros((40, 40, 3), np.uint8)
    with pytest.raises(UsageError, match="interpolation 'lanczos'.*bicubic-tf1-legacy or bilinear-tf2"):
        pipelines.prepare(image, {**TF1, "interpolation": "lanczos"})
    with pytest.raises(UsageError, match="odd pixel top/left"):
        pipelines.crop(image, {**TF1, "crop_offset": "floor"})
    with pytest.raises(UsageError, match="odd pixel top/left"):  # the card itself, before any image is read
        pipelines.pipeline_of({**TF1, "crop": "none"})
    with pytest.raises(UsageError, match="TF2 bilinear cards"):
        pipelines.pipeline_of({**SETTINGS["tf2 no crop"], "crop": "random"})
    with pytest.raises(UsageError, match="HxWx3"):
        pipelines.crop(np.zeros((40, 40), np.uint8), TF1)


def test_crops_are_writable_for_torch(tmp_path):
    """A PNG decoded by PIL is a read-only array; an uncropped (V2 "none") crop must still be one torch can own."""
    from PIL import Image

    path = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(path)
    crop = pipelines.crop(path, SETTINGS["tf2 no crop"])
    assert crop.flags.writeable and crop.flags.c_contiguous and crop.shape == (40, 50, 3)


def test_every_pipeline_has_tensorflow_ops_for_against_tf():
    assert set(TF_PIPELINES) == set(pipelines.PIPELINES)
