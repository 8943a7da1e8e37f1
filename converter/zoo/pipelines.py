"""The preprocessing pipelines a model card can name (its `interpolation`), each split where it may run apart.

A pipeline is a row of `PIPELINES`: `crop` (decoded HxWx3 image -> the part to resize, on the CPU), `resize`
(that crop -> 3xSxS float32 with mean/std, numpy on the CPU) and `resize_torch` (the same on a tensor, on the
tensor's device: `effconv eval --resize-on-device` decodes and crops on the CPU workers and resizes on the GPU).
Both resizes give the same bits, which equal TensorFlow's. A third recipe is a third row.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from effconv.errors import UsageError
from effconv.zoo import legacy_bicubic, preprocess, resize_tf2

Mean = Sequence[float]


@dataclass(frozen=True)
class Pipeline:
    interpolation: str  # the card's `interpolation`
    check: Callable[[dict], None]  # refuses card settings the recipe does not have (UsageError), before any image
    crop: Callable[[np.ndarray, dict], np.ndarray]  # (decoded image, card preprocessing) -> crop (a view)
    resize: Callable[[np.ndarray, int, Mean, Mean], np.ndarray]  # (crop, size, mean, std) -> 3xSxS
    resize_torch: Callable  # (HxWx3 tensor, size, mean, std) -> 3xSxS float32 tensor on its device
    warm: Callable[[], object] = lambda: None  # readies `resize` (e.g. compiles it) before workers fork


def _tf1_check(settings: dict) -> None:
    if settings.get("crop", "center") != "center" or settings.get("crop_offset", "ceil") != "ceil":
        raise UsageError("TF1 bicubic cards crop the centre with the odd pixel top/left; this card says otherwise")


def _tf1_crop(image: np.ndarray, settings: dict) -> np.ndarray:
    """The TPU repo's centre crop: side S/(S+pad) of the short edge, the odd margin pixel top/left."""
    # crop_padding null: the newer TPU-repo rule (0.875 of the short edge at every size); absent: 32
    return preprocess.center_crop(image, int(settings["image_size"]), settings.get("crop_padding", 32))


def _tf1_resize(crop: np.ndarray, size: int, mean: Mean, std: Mean) -> np.ndarray:
    return legacy_bicubic.resize_planar(preprocess.checked_resize_input(crop, size, size), size, size, mean, std)


def _tf1_resize_torch(crop, size: int, mean: Mean, std: Mean):
    return preprocess.preprocess_crop_torch(crop, size, mean, std)


def _tf2_check(settings: dict) -> None:
    if settings.get("crop", "center") not in ("center", "none") or settings.get("crop_offset", "ceil") not in (
        "ceil",
        "floor",
    ):
        raise UsageError("TF2 bilinear cards crop the centre (odd pixel by crop_offset ceil or floor) or not at all")


def _tf2_crop(image: np.ndarray, settings: dict) -> np.ndarray:
    """EfficientNetV2's: the whole image (`crop` "none"), or automl's centre square (`crop_offset` "floor")."""
    if settings.get("crop", "center") == "none":
        return image
    floor = settings.get("crop_offset", "ceil") == "floor"
    padding = int(settings.get("crop_padding") or 32)  # automl's margin; it has no 0.875 rule
    return resize_tf2.center_crop_v2(image, int(settings["image_size"]), padding, floor)


def _tf2_resize(crop: np.ndarray, size: int, mean: Mean, std: Mean) -> np.ndarray:
    out = preprocess.normalize(resize_tf2.resize_bilinear_tf2(crop, size, size), mean, std)
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def _tf2_resize_torch(crop, size: int, mean: Mean, std: Mean):
    return legacy_bicubic.normalise_torch(resize_tf2.resize_bilinear_tf2_torch(crop, size, size), mean, std)


PIPELINES = {
    p.interpolation: p
    for p in (
        Pipeline(
            "bicubic-tf1-legacy", _tf1_check, _tf1_crop, _tf1_resize, _tf1_resize_torch, legacy_bicubic.fast_kernel
        ),
        Pipeline("bilinear-tf2", _tf2_check, _tf2_crop, _tf2_resize, _tf2_resize_torch),
    )
}
INTERPOLATIONS = tuple(PIPELINES)  # a card naming another is refused, never approximated


def pipeline_of(settings: dict) -> Pipeline:
    """The pipeline of a card's preprocessing (no `interpolation`: the TPU repo's, as effconv 0.1 cards), its
    settings checked: a card the recipe cannot follow is refused here, not image by image."""
    interpolation = settings.get("interpolation") or INTERPOLATIONS[0]
    if interpolation not in PIPELINES:
        raise UsageError(
            f"the card's preprocessing names interpolation {interpolation!r}; effconv applies "
            f"{' or '.join(INTERPOLATIONS)}"
        )
    pipeline = PIPELINES[interpolation]
    pipeline.check(settings)
    return pipeline


def _pixels(image: np.ndarray | str | os.PathLike | bytes) -> np.ndarray:
    pixels = image if isinstance(image, np.ndarray) else preprocess.decode_image(image)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise UsageError(f"expected an HxWx3 RGB image, got shape {pixels.shape}")
    return pixels


def crop(image: np.ndarray | str | os.PathLike | bytes, settings: dict) -> np.ndarray:
    """Decode (if need be) and crop as the card says: HxWx3 uint8 as decoded, contiguous and writable (a tensor's)."""
    pipeline = pipeline_of(settings)
    return np.require(pipeline.crop(_pixels(image), settings), requirements=("C", "W"))


def prepare(image: np.ndarray | str | os.PathLike | bytes, settings: dict) -> np.ndarray:
    """One image -> 3xSxS float32, ready to stack into a batch, exactly as the card's `preprocessing` says."""
    pipeline = pipeline_of(settings)
    pixels = _pixels(image)
    size = int(settings["image_size"])
    return pipeline.resize(pipeline.crop(pixels, settings), size, settings["mean"], settings["std"])


def prepare_on_device(crop_tensor, settings: dict):
    """A `crop` (as a tensor, on any device) -> 3xSxS float32 there, the same bits as `prepare`."""
    size = int(settings["image_size"])
    return pipeline_of(settings).resize_torch(crop_tensor, size, settings["mean"], settings["std"])
