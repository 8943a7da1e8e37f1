"""Every path of the TF1 bicubic preprocessing against TensorFlow's own ops, bit for bit, on generated JPEGs.

The fast CPU path (the compiled kernel), the plain numpy reference and the torch path (CPU tensors) must give
exactly TF's floats (max |diff| 0.0) after decode_jpeg, the float32 crop arithmetic, resize_bicubic and mean/std,
at the released sizes and odd ones, down and up (crops smaller than the target).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from effconv.variants import ADVPROP_MEAN, ADVPROP_STD, IMAGENET_MEAN, IMAGENET_STD
from effconv.zoo import legacy_bicubic
from effconv.zoo import preprocess as pp

SIZES = (224, 225, 300, 600, 800)

# width x height: ImageNet-like landscape and portrait, odd sides, a wide panorama, a large photo (downsampled at
# every size) and small ones (upsampled at every size, one below the smallest crop side of 224 px).
JPEG_SHAPES = ((500, 375), (375, 500), (333, 777), (1001, 257), (1280, 960), (211, 157), (97, 131))


def _photo_like(width: int, height: int, seed: int) -> np.ndarray:
    """Smooth colour fields with sharp edges and grain: every tap weight and the cubic's overshoot get used."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8))
    pixels = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    pixels[: height // 3, width // 2 :] = 255 - pixels[: height // 3, width // 2 :]  # hard edges
    return np.clip(pixels + rng.normal(0, 8, pixels.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("jpegs")
    files = []
    for i, (width, height) in enumerate(JPEG_SHAPES):
        image = Image.fromarray(_photo_like(width, height, i))
        subsampling = 0 if i % 3 == 2 else 2  # 4:4:4 for some, 4:2:0 (PIL's default) for the rest
        files.append(folder / f"photo_{width}x{height}.jpg")
        image.save(files[-1], quality=(75, 90, 95)[i % 3], subsampling=subsampling)
    return files


def _max_diff(ours, theirs) -> float:
    ours = ours.detach().numpy() if isinstance(ours, torch.Tensor) else ours
    assert ours.shape == theirs.shape and ours.dtype == np.float32
    return float(np.abs(ours.astype(np.float64) - theirs).max())


def _tf(path: Path, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """TF's ops (decode_jpeg, crop, resize_bicubic, mean/std), channels first."""
    return pp.preprocess_tf(path, size, mean, std).transpose(2, 0, 1)


@pytest.mark.parametrize("size", SIZES)
def test_every_path_equals_tf(jpegs, size):
    assert legacy_bicubic.fast_kernel() is not None, "numba is missing, or its kernel rounds unlike TF here"
    for path in jpegs:
        theirs = _tf(path, size)
        crop = pp.decode_and_crop(path, size)
        assert crop.dtype == np.uint8 and crop.flags.c_contiguous
        fast = np.ascontiguousarray(pp.preprocess(path, size).transpose(2, 0, 1))
        reference = pp.normalize(legacy_bicubic.resize_reference(crop, size, size), IMAGENET_MEAN, IMAGENET_STD)
        on_torch = pp.preprocess_crop_torch(torch.from_numpy(crop), size)
        assert on_torch.shape == (3, size, size) and on_torch.is_contiguous()
        for name, ours in (("fast", fast), ("reference", reference.transpose(2, 0, 1)), ("torch", on_torch)):
            assert _max_diff(ours, theirs) == 0.0, (name, path.name, size)


@pytest.mark.parametrize("size", (224, 800))
def test_unnormalised_and_advprop_equal_tf(jpegs, size):
    for path in jpegs[:3]:
        raw = pp.preprocess_tf(path, size, None, None).transpose(2, 0, 1)
        assert _max_diff(np.ascontiguousarray(pp.preprocess(path, size, None, None).transpose(2, 0, 1)), raw) == 0.0
        crop = torch.from_numpy(pp.decode_and_crop(path, size))
        assert _max_diff(pp.preprocess_crop_torch(crop, size, None, None), raw) == 0.0
        advprop = _tf(path, size, ADVPROP_MEAN, ADVPROP_STD)
        assert _max_diff(pp.preprocess_crop_torch(crop, size, ADVPROP_MEAN, ADVPROP_STD), advprop) == 0.0


def test_reference_fallback_equals_tf(jpegs, monkeypatch):
    """Without a usable compiled kernel (no numba, or code that fuses multiply-adds) the numpy reference runs."""
    monkeypatch.setattr(legacy_bicubic, "fast_kernel", lambda: None)
    assert legacy_bicubic.kernel_name() == "numpy reference"
    for path in jpegs[:2] + jpegs[-1:]:
        assert _max_diff(np.ascontiguousarray(pp.preprocess(path, 300).transpose(2, 0, 1)), _tf(path, 300)) == 0.0


def test_in_memory_bytes_and_arrays_give_the_same_bits(jpegs):
    path = jpegs[0]
    from_path = pp.preprocess(path, 600)
    assert np.array_equal(pp.preprocess(path.read_bytes(), 600), from_path)
    assert np.array_equal(pp.preprocess(pp.decode_image(io.BytesIO(path.read_bytes()).getvalue()), 600), from_path)
