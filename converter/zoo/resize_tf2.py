"""EfficientNetV2's evaluation resize: TF2's `tf.image.resize` (bilinear, half-pixel centres), bit for bit.

`preprocessing.preprocess_for_eval` in google/automl `efficientnetv2` crops the centre square of side
int(S / (S + 32) * short edge) only below 320 px (its margin's odd pixel at the bottom/right), then
resizes with `tf.image.resize`, whose bilinear kernel works in float32: source coordinate
(x + 0.5) * (in / out) - 0.5, the neighbours at its floor and ceiling (clamped to the image), and two
linear interpolations along x, then one along y. Done here in the same float32 operations and order,
so the output equals TensorFlow's exactly.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=64)
def _taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per output index: the lower and upper source index and the weight of the upper, as TF computes them."""
    scale = np.float32(in_size) / np.float32(out_size)
    source = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    floor = np.floor(source)
    lower = np.maximum(floor.astype(np.int64), 0)
    upper = np.minimum(np.ceil(source).astype(np.int64), in_size - 1)
    return lower, upper, (source - floor).astype(np.float32)


def resize_bilinear_tf2(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """HxWxC image (any real dtype) -> height x width x C float32, equal to `tf.image.resize(..., "bilinear")`."""
    img = np.asarray(image).astype(np.float32, copy=False)
    top_y, bottom_y, y_lerp = _taps(img.shape[0], height)
    left_x, right_x, x_lerp = _taps(img.shape[1], width)
    x_lerp = x_lerp[None, :, None]

    def along_x(rows: np.ndarray) -> np.ndarray:
        left, right = rows[:, left_x], rows[:, right_x]
        return left + (right - left) * x_lerp

    top, bottom = along_x(img[top_y]), along_x(img[bottom_y])
    return top + (bottom - top) * y_lerp[:, None, None]


def center_crop_v2(image: np.ndarray, image_size: int, crop_padding: int = 32, floor: bool = True) -> np.ndarray:
    """automl's centre square: side int(float32(S / (S + pad)) * short edge), offsets (h - side) // 2 (a view).

    `floor=False` puts the margin's odd pixel top/left instead, as the TPU repo does.
    """
    height, width = image.shape[:2]
    side = int(np.float32(image_size / (image_size + crop_padding)) * np.float32(min(height, width)))
    if side < 1:
        from effconv.errors import UsageError

        raise UsageError(f"image of {height}x{width} pixels is too small to crop for {image_size} px input")
    odd = 0 if floor else 1
    top, left = (height - side + odd) // 2, (width - side + odd) // 2
    return image[top : top + side, left : left + side]


@lru_cache(maxsize=256)
def _torch_taps(in_size: int, out_size: int, device: str):
    """`_taps` as tensors on `device`, copied there once per size (not once per image)."""
    import torch

    return tuple(torch.from_numpy(np.asarray(a)).to(device) for a in _taps(in_size, out_size))


def resize_bilinear_tf2_torch(image, height: int, width: int):
    """HxWxC tensor (any dtype, any device) -> C x height x width float32 there, `resize_bilinear_tf2`'s bits.

    The same gathers and separate subtract, multiply and add kernels, in the same order, on a channels-first view.
    """
    planar = image.permute(2, 0, 1).float()
    top_y, bottom_y, y_lerp = _torch_taps(image.shape[0], height, str(image.device))
    left_x, right_x, x_lerp = _torch_taps(image.shape[1], width, str(image.device))

    def along_x(rows):
        left, right = rows.index_select(2, left_x), rows.index_select(2, right_x)
        return left + (right - left) * x_lerp

    top, bottom = along_x(planar.index_select(1, top_y)), along_x(planar.index_select(1, bottom_y))
    return (top + (bottom - top) * y_lerp[:, None]).contiguous()
