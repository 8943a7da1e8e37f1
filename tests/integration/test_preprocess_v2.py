"""EfficientNetV2's evaluation pipeline as the card records it, against automl's own TensorFlow ops, bit for bit.

automl `preprocessing.preprocess_for_eval`: centre crop only below 320 px (side int(S / (S + 32) * short edge),
offsets (h - side) // 2), `tf.image.resize` (bilinear, half-pixel centres), then (x - 128) / 128.
"""

from __future__ import annotations

import io

import numpy as np
import pytest

from effconv.errors import UsageError
from effconv.variants import preprocessing
from effconv.zoo.inference import prepare


def _automl_eval(jpeg: bytes, image_size: int, crop: bool, mean, std) -> np.ndarray:
    import tensorflow as tf

    image = tf.io.decode_jpeg(jpeg, channels=3)
    if crop:
        height, width = tf.shape(image)[0], tf.shape(image)[1]
        ratio = image_size / (image_size + 32)
        side = tf.cast(ratio * tf.cast(tf.minimum(height, width), tf.float32), tf.int32)
        image = tf.image.crop_to_bounding_box(image, (height - side) // 2, (width - side) // 2, side, side)
    image = tf.image.resize(image, [image_size, image_size])
    return ((image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)).numpy().transpose(2, 0, 1)


def _jpeg(height: int, width: int, seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    smooth = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    pixels = np.kron(smooth, np.ones((8, 8, 1), dtype=np.uint8))[:height, :width]
    pixels = np.clip(pixels.astype(np.int16) + rng.integers(-20, 20, pixels.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90, subsampling=0)
    return out.getvalue()


@pytest.mark.parametrize(
    ("arch", "variant", "size", "crop"),
    [
        ("v2-s", "standard", 384, False),  # native: the whole image, squashed to a square
        ("v2-s", "standard", 300, True),  # below 320 px: the centre crop, odd margin pixel bottom/right
        ("v2-l", "in21k", 224, True),  # the 21k releases: every size at 224 px
        ("v2-b0", "in21k-ft1k", 224, False),  # the 21k-ft1k releases: no crop at any size
    ],
)
def test_v2_pipeline_equals_automl(arch, variant, size, crop):
    card = preprocessing(variant, size, arch)
    assert card["interpolation"] == "bilinear-tf2" and (card["crop"] == "center") == crop
    for seed, (height, width) in enumerate([(375, 500), (333, 251), (224, 225)]):
        jpeg = _jpeg(height, width, seed)
        ours = prepare(jpeg, card)
        theirs = _automl_eval(jpeg, size, crop, card["mean"], card["std"])
        assert ours.shape == theirs.shape == (3, size, size)
        assert np.abs(ours - theirs).max() == 0.0, (height, width)


def test_v2_b0_keeps_the_v1_pipeline():
    card = preprocessing("standard", 224, "v2-b0")
    assert (card["interpolation"], card["crop"], card["mean"]) == (
        "bicubic-tf1-legacy",
        "center",
        [123.675, 116.28, 103.53],
    )
    assert "crop_offset" not in card


def test_unknown_interpolation_is_refused():
    card = preprocessing("standard", 224, "v2-s") | {"interpolation": "lanczos"}
    with pytest.raises(UsageError, match="interpolation 'lanczos'"):
        prepare(np.zeros((10, 10, 3), np.uint8), card)
