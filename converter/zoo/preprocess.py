"""The official EfficientNet evaluation preprocessing, reproduced exactly.

decode (RGB uint8) -> centre crop of side S/(S+pad) of the short edge -> TF1 legacy bicubic resize to S x S
(float 0-255, not clipped) -> (x - mean) / std. The resize (`legacy_bicubic.py`) runs on the CPU (compiled by numba),
or in torch on any device (`preprocess_crop_torch`, after `decode_and_crop` on the CPU); both give TF's bits.
`preprocess_tf` runs the same pipeline with TensorFlow's own ops, as the reference they are checked against.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np

from effconv.errors import UsageError, one_line
from effconv.variants import CROP_PADDING, IMAGENET_MEAN, IMAGENET_STD
from effconv.zoo import legacy_bicubic

CROP_FRACTION = 0.875  # the newer TPU-repo rule keeps this fraction at every size

_JPEG_MAGIC = b"\xff\xd8\xff"


def modern_crop_padding(image_size: int) -> int:
    """The padding of the newer TPU-repo code, which crops 0.875 of the short edge at every size."""
    return round(image_size * (1 / CROP_FRACTION - 1))


def crop_size(height: int, width: int, image_size: int, crop_padding: int | None = CROP_PADDING) -> int:
    """Side of the centre crop; `crop_padding=None` takes the newer rule.

    Multiplied in float32 before truncating, as the official graph does (float64 agrees for every released size
    and short edges up to 4000 px, but a product close to a whole number could round either way).
    """
    if crop_padding is None:
        crop_padding = modern_crop_padding(image_size)
    fraction = np.float32(image_size / (image_size + crop_padding))
    return int(fraction * np.float32(min(height, width)))


def crop_offsets(height: int, width: int, crop: int) -> tuple[int, int]:
    """Top and left offset of the centre crop (the odd pixel goes to the top/left margin)."""
    return ((height - crop) + 1) // 2, ((width - crop) + 1) // 2


def center_crop(image: np.ndarray, image_size: int, crop_padding: int | None = CROP_PADDING) -> np.ndarray:
    """The official square centre crop of an HxWxC image (a view, not a copy)."""
    height, width = image.shape[:2]
    crop = crop_size(height, width, image_size, crop_padding)
    if crop < 1:
        raise UsageError(f"image of {height}x{width} pixels is too small to crop for {image_size} px input")
    top, left = crop_offsets(height, width, crop)
    return image[top : top + crop, left : left + crop]


def resize_bicubic_tf1(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """`tf.compat.v1.image.resize_bicubic(align_corners=False, half_pixel_centers=False)` of an HxWxC image.

    Any dtype in, float32 out, not clipped, bit-identical to TF's on CPU. The result is a height x width x C view
    of a channels-first array (`np.ascontiguousarray(out.transpose(2, 0, 1))` gets that array without a copy).
    """
    image = checked_resize_input(image, height, width)
    return legacy_bicubic.resize_planar(image, height, width).transpose(1, 2, 0)


def checked_resize_input(image: np.ndarray, height: int, width: int) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[0] < 1 or image.shape[1] < 1 or image.shape[2] < 1:
        raise UsageError(f"resize needs a non-empty HxWxC image, got shape {image.shape}")
    if height < 1 or width < 1:
        raise UsageError(f"resize target must be at least 1x1, got {height}x{width}")
    return legacy_bicubic.as_float_input(image)


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(x - mean) / std per channel in float32, as the official graph does it."""
    mean32 = np.asarray(mean, dtype=np.float32)
    std32 = np.asarray(std, dtype=np.float32)
    return (np.asarray(image, dtype=np.float32) - mean32) / std32


def decode_image(path_or_bytes: str | os.PathLike | bytes | bytearray | memoryview) -> np.ndarray:
    """HxWx3 uint8 RGB from a JPEG/PNG file or its bytes; greyscale, alpha and palette images become RGB.

    Pixels equal TensorFlow's default decoders (the official pipeline's), EXIF orientation ignored as there.
    JPEG goes through libjpeg-turbo (simplejpeg) with the fast integer IDCT and smooth chroma upsampling, TF's
    defaults; PIL would use the accurate IDCT and differ by a few levels in most pixels. Everything else is
    decoded by PIL.
    """
    is_bytes = isinstance(path_or_bytes, (bytes, bytearray, memoryview))
    label = "image bytes" if is_bytes else os.fspath(path_or_bytes)
    if is_bytes:
        data = bytes(path_or_bytes)
    else:
        try:
            with open(path_or_bytes, "rb") as f:
                data = f.read()
        except OSError as e:
            raise UsageError(f"cannot read image {label}: {e.strerror or e}") from None
    if data[:3] == _JPEG_MAGIC:
        pixels = _decode_jpeg_like_tf(data)
        if pixels is not None:
            return pixels
    return _decode_with_pil(data, label)


def _decode_jpeg_like_tf(data: bytes) -> np.ndarray | None:
    """TF's default JPEG decoding, or None when libjpeg-turbo refuses the file (PIL then tries)."""
    import simplejpeg

    try:
        colorspace = simplejpeg.decode_jpeg_header(data)[2]
        if colorspace in ("CMYK", "YCCK"):
            # TF decodes to (inverted, Adobe-style) CMYK and takes floor(c * k / 255) per channel.
            cmyk = simplejpeg.decode_jpeg(data, colorspace="CMYK", fastdct=True, fastupsample=False)
            cmyk = cmyk.astype(np.uint16)
            return (cmyk[:, :, :3] * cmyk[:, :, 3:] // 255).astype(np.uint8)
        return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True, fastupsample=False)
    except ValueError:  # truncated or corrupt data, an unsupported variant: PIL decides
        return None


def _decode_with_pil(data: bytes, label: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return _to_rgb(img)
    except UnidentifiedImageError:  # PIL's message names its in-memory buffer, not the file
        raise UsageError(f"cannot read image {label}: not an image format effconv reads, or corrupt") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UsageError(f"cannot read image {label}: {e}") from None


def _to_rgb(img) -> np.ndarray:
    if img.mode.startswith("I"):  # 16-bit greyscale PNG: keep the high byte, as TF's uint8 decoding does
        grey = (np.asarray(img).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.asarray(img.convert("RGB"))


def preprocess(
    image_or_path: np.ndarray | str | os.PathLike | bytes,
    image_size: int,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
    crop_padding: int | None = CROP_PADDING,
) -> np.ndarray:
    """The official eval preprocessing: HxWx3 float32, ready to be stacked into NHWC.

    `image_or_path` is an HxWx3 RGB array (uint8 0-255) or something `decode_image` reads. `mean=std=None`
    skips normalisation (float 0-255 out); `crop_padding=None` takes the newer 0.875 rule. The result is a view of
    a channels-first array: `np.ascontiguousarray(out.transpose(2, 0, 1))` is that array, for NCHW, without a copy.
    """
    crop = decode_and_crop(image_or_path, image_size, crop_padding, copy=False)
    crop = checked_resize_input(crop, image_size, image_size)
    if mean is None and std is None:
        planar = legacy_bicubic.resize_planar(crop, image_size, image_size)
    else:
        planar = legacy_bicubic.resize_planar(crop, image_size, image_size, _or_zero(mean), _or_one(std))
    return planar.transpose(1, 2, 0)


def decode_and_crop(
    image_or_path: np.ndarray | str | os.PathLike | bytes,
    image_size: int,
    crop_padding: int | None = CROP_PADDING,
    copy: bool = True,
) -> np.ndarray:
    """Decode (if need be) and take the official centre crop: HxWx3, as decoded (uint8), contiguous.

    The CPU half of the pipeline when the resize runs elsewhere (`preprocess_crop_torch` on a GPU); crops differ
    in size from image to image. `copy=False` may return a view of the decoded image.
    """
    image = image_or_path if isinstance(image_or_path, np.ndarray) else decode_image(image_or_path)
    if image.ndim != 3 or image.shape[2] != 3:
        raise UsageError(f"expected an HxWx3 RGB image, got shape {image.shape}")
    crop = center_crop(image, image_size, crop_padding)
    return np.ascontiguousarray(crop) if copy else crop


def preprocess_crop_torch(
    crop,
    image_size: int,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
):
    """The resize and normalisation of a `decode_and_crop` crop in torch, on the crop's device: 3 x S x S float32.

    `crop` is an HxWx3 tensor (uint8 as decoded; any dtype is cast as TF casts it), on the CPU or a GPU. The bits
    equal `preprocess`'s (channels first), which equal TF's. `mean=std=None` skips normalisation.
    """
    if crop.dim() != 3 or crop.shape[2] != 3 or crop.shape[0] < 1 or crop.shape[1] < 1:
        raise UsageError(f"expected an HxWx3 crop, got shape {tuple(crop.shape)}")
    planar = legacy_bicubic.resize_torch(crop, image_size, image_size)
    if mean is None and std is None:
        return planar
    return legacy_bicubic.normalise_torch(planar, _or_zero(mean), _or_one(std))


def preprocess_tf(
    path: str | os.PathLike,
    image_size: int,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
    crop_padding: int | None = CROP_PADDING,
    decode_and_crop: bool = False,
) -> np.ndarray:
    """The same pipeline with TensorFlow's own ops (decode, float32 crop arithmetic, legacy resize_bicubic).

    By default the whole image is decoded and then sliced. `decode_and_crop=True` decodes a JPEG's crop window
    only, as the official input pipeline does (`tf.image.decode_and_crop_jpeg`); for chroma-subsampled JPEGs
    that changes a few pixels in the crop's edge rows/columns.
    """
    import tensorflow as tf

    if crop_padding is None:
        crop_padding = modern_crop_padding(image_size)
    try:
        contents = tf.io.read_file(os.fspath(path))
        crop_jpeg = decode_and_crop and bool(tf.io.is_jpeg(contents))
        if crop_jpeg:
            shape = tf.image.extract_jpeg_shape(contents)
        else:
            image = tf.io.decode_image(contents, channels=3, expand_animations=False)
            shape = tf.shape(image)
        height, width = shape[0], shape[1]
        fraction = image_size / (image_size + crop_padding)
        crop = tf.cast(fraction * tf.cast(tf.minimum(height, width), tf.float32), tf.int32)
        top = ((height - crop) + 1) // 2
        left = ((width - crop) + 1) // 2
        if crop_jpeg:
            image = tf.image.decode_and_crop_jpeg(contents, tf.stack([top, left, crop, crop]), channels=3)
        else:
            image = image[top : top + crop, left : left + crop]
        resized = tf.compat.v1.image.resize_bicubic(
            image[None], [image_size, image_size], align_corners=False, half_pixel_centers=False
        )[0]
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as e:
        raise UsageError(f"cannot read image {os.fspath(path)}: {one_line(e.message, max_lines=1)}") from None
    if mean is not None or std is not None:
        resized = (resized - tf.constant(_or_zero(mean), tf.float32)) / tf.constant(_or_one(std), tf.float32)
    return resized.numpy()


def _or_zero(mean: Sequence[float] | None) -> Sequence[float]:
    return (0.0, 0.0, 0.0) if mean is None else mean


def _or_one(std: Sequence[float] | None) -> Sequence[float]:
    return (1.0, 1.0, 1.0) if std is None else std
