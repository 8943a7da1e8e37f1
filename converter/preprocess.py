"""Kept importable at its documented path; the preprocessing lives in `effconv.zoo.preprocess`."""

from effconv.zoo.preprocess import (  # noqa: F401
    center_crop,
    crop_size,
    decode_image,
    normalize,
    preprocess,
    preprocess_tf,
    resize_bicubic_tf1,
)
