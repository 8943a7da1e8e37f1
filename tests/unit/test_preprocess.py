"""The numpy eval preprocessing against TensorFlow's own ops, on random arrays and real photographs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from effconv.errors import UsageError
from effconv.variants import ADVPROP_MEAN, ADVPROP_STD, IMAGENET_MEAN, IMAGENET_STD
from effconv.zoo import legacy_bicubic
from effconv.zoo import preprocess as pp

TOL = 1e-3  # pixels have a known scale, 0-255: 1e-3 is 4e-6 of it (measured: 0 with oneDNN on and off)


@pytest.fixture(scope="module")
def tf():
    import tensorflow

    return tensorflow


def tf_resize(tf, image: np.ndarray, height: int, width: int) -> np.ndarray:
    return tf.compat.v1.image.resize_bicubic(
        image[None], [height, width], align_corners=False, half_pixel_centers=False
    )[0].numpy()


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.abs(a.astype(np.float64) - b).max())


# ---- resize -------------------------------------------------------------------------------------------------


RESIZE_CASES = [
    ((328, 328), (224, 224)),  # the b0 crop of a 500x375 photo
    ((375, 500), (224, 224)),  # non-square down
    ((50, 60), (300, 300)),  # up
    ((521, 521), (475, 475)),
    ((613, 757), (800, 800)),  # up, L2's size
    ((13, 17), (224, 300)),  # far up, non-square out
    ((1, 7), (5, 9)),  # one-pixel-high: every row index clamps
    ((7, 1), (3, 4)),
    ((1, 1), (4, 4)),
    ((3, 5), (1, 1)),
    ((40, 40), (40, 40)),  # identity
]


@pytest.mark.parametrize("in_hw, out_hw", RESIZE_CASES)
def test_resize_matches_tf(tf, in_hw, out_hw):
    image = np.random.default_rng(sum(in_hw + out_hw)).integers(0, 256, (*in_hw, 3), dtype=np.uint8)
    ours = pp.resize_bicubic_tf1(image, *out_hw)
    assert ours.dtype == np.float32
    assert max_diff(ours, tf_resize(tf, image, *out_hw)) <= TOL


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.uint16])
def test_resize_any_dtype_and_channels(tf, dtype):
    image = (np.random.default_rng(1).random((23, 31, 4)) * 1000 - 300).astype(dtype)
    ours = pp.resize_bicubic_tf1(image, 40, 17)
    assert ours.dtype == np.float32 and ours.shape == (40, 17, 4)
    assert max_diff(ours, tf_resize(tf, image, 40, 17)) <= TOL


def test_resize_overshoots_unclipped(tf):
    image = np.zeros((30, 30, 3), np.uint8)
    image[:, 15:] = 255
    ours = pp.resize_bicubic_tf1(image, 47, 47)
    assert ours.max() > 255 and ours.min() < 0  # the cubic's ringing is kept, as in TF
    assert max_diff(ours, tf_resize(tf, image, 47, 47)) <= TOL


@pytest.mark.parametrize("in_hw, out_hw", RESIZE_CASES)
def test_every_resize_path_is_bit_identical_to_tf(tf, in_hw, out_hw):
    """The compiled CPU path, the numpy reference and torch (CPU tensors) give TF's floats exactly."""
    image = np.random.default_rng(sum(in_hw + out_hw) + 1).integers(0, 256, (*in_hw, 3), dtype=np.uint8)
    theirs = tf_resize(tf, image, *out_hw)
    paths = {
        "fast": pp.resize_bicubic_tf1(image, *out_hw),
        "reference": legacy_bicubic.resize_reference(image, *out_hw),
        "torch": legacy_bicubic.resize_torch(torch.from_numpy(image), *out_hw).permute(1, 2, 0).numpy(),
    }
    for name, ours in paths.items():
        assert ours.dtype == np.float32 and ours.shape == theirs.shape, name
        assert max_diff(ours, theirs) == 0.0, name


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.uint16])
def test_torch_resize_any_dtype_and_channels(tf, dtype):
    image = (np.random.default_rng(2).random((23, 31, 4)) * 1000 - 300).astype(dtype)
    ours = legacy_bicubic.resize_torch(torch.from_numpy(image), 40, 17)
    assert ours.dtype == torch.float32 and ours.shape == (4, 40, 17)
    assert max_diff(ours.permute(1, 2, 0).numpy(), tf_resize(tf, image, 40, 17)) == 0.0


def test_resize_result_is_a_channels_first_array_seen_as_hwc():
    """NCHW consumers get the channels-first array back without a copy."""
    out = pp.preprocess(np.random.default_rng(4).integers(0, 256, (90, 120, 3), dtype=np.uint8), 64)
    assert out.shape == (64, 64, 3)
    chw = np.ascontiguousarray(out.transpose(2, 0, 1))
    assert chw.flags.c_contiguous and np.shares_memory(chw, out)


def test_kernel_probe_accepts_the_compiled_kernel_and_refuses_fused_or_reordered_ones():
    assert legacy_bicubic.fast_kernel() is not None, "numba is missing, or its kernel rounds unlike TF here"
    assert legacy_bicubic._rounds_like_tf(legacy_bicubic.fast_kernel())

    def planar(image, rows_i, rows_w, cols_i, cols_w):
        return image.astype(np.float64), rows_i, rows_w.astype(np.float64), cols_i, cols_w.astype(np.float64)

    def fused(image, rows_i, rows_w, cols_i, cols_w, shift, scale, out):
        """Sums in float64 and rounds once: what fused multiply-adds approach."""
        x, rows_i, rows_w, cols_i, cols_w = planar(image, rows_i, rows_w, cols_i, cols_w)
        vertical = (x[rows_i] * rows_w[:, :, None, None]).sum(axis=1)
        both = (vertical[:, cols_i] * cols_w[None, :, :, None]).sum(axis=2).astype(np.float32)
        out[...] = ((both - shift) / scale).transpose(2, 0, 1)

    def reordered(image, rows_i, rows_w, cols_i, cols_w, shift, scale, out):
        """The right products, summed from the last tap to the first."""
        rows = legacy_bicubic._interpolate(image, rows_i[:, ::-1], rows_w[:, ::-1], axis=0)
        both = legacy_bicubic._interpolate(rows, cols_i[:, ::-1], cols_w[:, ::-1], axis=1)
        out[...] = ((both - shift) / scale).transpose(2, 0, 1)

    def other_signature(image, height, width):
        return legacy_bicubic.resize_reference(image, height, width)

    image = np.random.default_rng(1).integers(0, 256, (23, 37, 3), dtype=np.uint8)
    taps = (*legacy_bicubic._kernel_taps(23, 41), *legacy_bicubic._kernel_taps(37, 19))
    shift, scale = np.float32([100, 0, 50]), np.float32([50, 1, 60])
    expected = np.ascontiguousarray(
        ((legacy_bicubic.resize_reference(image, 41, 19) - shift) / scale).transpose(2, 0, 1)
    )
    for kernel in (fused, reordered):  # they run, and differ: refused for their bits, not for failing
        got = np.empty((3, 41, 19), np.float32)
        kernel(image, *taps, shift, scale, got)
        assert np.abs(got - expected).max() < 1e-3 and not np.array_equal(got, expected), kernel.__name__
    for kernel in (fused, reordered, other_signature):
        assert not legacy_bicubic._rounds_like_tf(kernel), kernel.__name__


def test_fast_path_equals_the_reference_bit_for_bit():
    """Down, up, odd sizes, one and three channels, uint8 and float32, with and without mean/std."""
    assert legacy_bicubic.fast_kernel() is not None, "numba is missing, or its kernel rounds unlike TF here"
    rng = np.random.default_rng(7)
    for shape, out_hw in (((90, 120, 3), (64, 64)), ((31, 17, 3), (97, 45)), ((40, 33, 1), (33, 40))):
        for image in (rng.integers(0, 256, shape, dtype=np.uint8), (rng.random(shape) * 255).astype(np.float32)):
            reference = np.ascontiguousarray(legacy_bicubic.resize_reference(image, *out_hw).transpose(2, 0, 1))
            fast = legacy_bicubic.resize_planar(image, *out_hw)
            assert fast.flags.c_contiguous and fast.dtype == np.float32
            assert np.array_equal(fast.view(np.uint32), reference.view(np.uint32)), (shape, out_hw, image.dtype)
            mean, std = [100.0] * shape[2], [57.5] * shape[2]
            normalised = (reference - np.float32(100.0)) / np.float32(57.5)
            got = legacy_bicubic.resize_planar(image, *out_hw, mean, std)
            assert np.array_equal(got.view(np.uint32), normalised.view(np.uint32)), (shape, out_hw, "mean/std")
    view = rng.integers(0, 256, (50, 60, 3), dtype=np.uint8)[5:45, 7:50]  # a crop: not contiguous
    assert np.array_equal(legacy_bicubic.resize_planar(view, 30, 30), legacy_bicubic.resize_planar(view.copy(), 30, 30))


@pytest.mark.parametrize("fast", [True, False], ids=["compiled", "numpy"])
def test_mean_and_std_per_channel_or_one_for_all(fast, monkeypatch):
    if not fast:
        monkeypatch.setattr(legacy_bicubic, "fast_kernel", lambda: None)
    image = np.random.default_rng(2).integers(0, 256, (30, 20, 3), dtype=np.uint8)
    plain = legacy_bicubic.resize_planar(image, 16, 16)
    one = legacy_bicubic.resize_planar(image, 16, 16, 127.5, 127.5)
    assert np.array_equal(one, (plain - np.float32(127.5)) / np.float32(127.5))
    assert np.array_equal(
        legacy_bicubic.resize_planar(image, 16, 16, mean=[10, 20, 30]), plain - np.float32([10, 20, 30])[:, None, None]
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        assert np.isinf(legacy_bicubic.resize_planar(image, 16, 16, 0.0, 0.0)).any()  # / 0: inf, as numpy and TF
    with pytest.raises(UsageError, match="mean has 3 values for an image of 4 channels"):
        legacy_bicubic.resize_planar(np.zeros((8, 8, 4), np.uint8), 4, 4, [1, 2, 3], [1, 2, 3])
    as_float64 = legacy_bicubic.resize_planar(image.astype(np.float64), 16, 16)
    assert as_float64.dtype == np.float32 and np.array_equal(as_float64, plain)  # cast to float32 as TF casts


def test_torch_crop_rejects_bad_shapes():
    with pytest.raises(UsageError, match="HxWx3"):
        pp.preprocess_crop_torch(torch.zeros(4, 4, dtype=torch.uint8), 8)
    with pytest.raises(UsageError, match="HxWx3"):
        pp.preprocess_crop_torch(torch.zeros(4, 4, 4, dtype=torch.uint8), 8)


def test_resize_rejects_bad_shapes():
    with pytest.raises(UsageError):
        pp.resize_bicubic_tf1(np.zeros((4, 4)), 2, 2)
    with pytest.raises(UsageError):
        pp.resize_bicubic_tf1(np.zeros((4, 4, 3)), 0, 2)


# ---- crop ---------------------------------------------------------------------------------------------------


def test_crop_size_and_offsets_on_odd_sizes():
    assert pp.crop_size(375, 500, 224) == 328  # int(0.875 * 375)
    assert pp.crop_offsets(375, 500, 328) == (24, 86)  # ((375 - 328) + 1) // 2, ((500 - 328) + 1) // 2
    assert pp.crop_size(333, 777, 300) == 300  # int(300 / 332 * 333) = int(300.9)
    assert pp.crop_offsets(333, 777, 300) == (17, 239)
    assert pp.crop_offsets(334, 777, 300) == (17, 239)  # the odd pixel of the margin goes to the top
    image = np.arange(375 * 500 * 3, dtype=np.int64).reshape(375, 500, 3)
    assert np.array_equal(pp.center_crop(image, 224), image[24:352, 86:414])


def test_newer_crop_rule():
    assert [pp.modern_crop_padding(s) for s in (224, 300, 600, 800)] == [32, 43, 86, 114]
    assert pp.crop_size(375, 500, 600, crop_padding=None) == int(600 / 686 * 375) == 327
    assert pp.crop_size(375, 500, 600) == int(600 / 632 * 375) == 356  # release rule: 0.949 at b7


def test_crop_size_matches_tf_float32_arithmetic(tf):
    short = np.arange(1, 3001)
    for size, padding in [(224, 32), (300, 32), (475, 32), (600, 32), (800, 32), (600, 86)]:
        theirs = tf.cast(size / (size + padding) * tf.cast(short, tf.float32), tf.int32).numpy()
        ours = [pp.crop_size(int(s), int(s) + 7, size, padding) for s in short]
        assert np.array_equal(ours, theirs), size


def test_too_small_to_crop():
    with pytest.raises(UsageError, match="too small"):
        pp.center_crop(np.zeros((1, 5, 3), np.uint8), 224)


# ---- normalisation ------------------------------------------------------------------------------------------


def test_normalize():
    x = np.array([[[0, 127.5, 255]]], np.float32)
    assert np.allclose(pp.normalize(x, ADVPROP_MEAN, ADVPROP_STD), [[[-1, 0, 1]]])
    out = pp.normalize(x, IMAGENET_MEAN, IMAGENET_STD)
    assert out.dtype == np.float32
    # One float32 subtract-and-divide of values <= 2.7 (allclose also allows 1e-5 of each value).
    assert np.allclose(out, (x - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD), atol=1e-6)


# ---- decoding -----------------------------------------------------------------------------------------------


def _mode_images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(7)
    rgba = rng.integers(0, 256, (19, 23, 4), dtype=np.uint8)
    return {
        "L": Image.fromarray(rgba[:, :, 0]),
        "LA": Image.fromarray(rgba[:, :, :2].copy(), "LA"),
        "RGBA": Image.fromarray(rgba),
        "P": Image.fromarray(rgba[:, :, :3].copy()).quantize(37),
        "I;16": Image.fromarray(rng.integers(0, 65536, (19, 23), dtype=np.uint16)),
    }


@pytest.mark.parametrize("mode", list(_mode_images()))
def test_decode_png_modes_like_tf(tf, tmp_path, mode):
    path = tmp_path / f"{mode.replace(';', '')}.png"
    _mode_images()[mode].save(path)
    ours = pp.decode_image(path)
    assert ours.dtype == np.uint8 and ours.shape == (19, 23, 3)
    theirs = tf.io.decode_image(tf.io.read_file(str(path)), channels=3, expand_animations=False).numpy()
    assert np.array_equal(ours, theirs)
    assert np.array_equal(pp.decode_image(path.read_bytes()), ours)


def test_unreadable_images(tmp_path):
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image at all")
    buf = tmp_path / "whole.jpg"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(buf)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(buf.read_bytes()[:300])
    for bad in (tmp_path / "missing.png", garbage, truncated, tmp_path, b"\x89PNG nonsense"):
        with pytest.raises(UsageError, match="cannot read image"):
            pp.preprocess(bad, 224)
    with pytest.raises(UsageError, match="cannot read image"):
        pp.preprocess_tf(garbage, 224)


# ---- real photographs ---------------------------------------------------------------------------------------


def _photos() -> dict[str, np.ndarray]:
    """scikit-image's sample photographs, reshaped to assorted sizes and aspect ratios."""
    from skimage import data

    astronaut = Image.fromarray(data.astronaut())
    return {
        "astronaut_500x375": np.asarray(astronaut.resize((500, 375), Image.Resampling.LANCZOS)),
        "coffee": data.coffee(),  # 400x600
        "chelsea_tall": np.ascontiguousarray(data.chelsea().transpose(1, 0, 2)),  # 451x300
        "rocket": data.rocket(),  # 427x640
        "hubble_odd": data.hubble_deep_field()[:637, :871],
        "camera_grey": data.camera(),  # greyscale: decoded to RGB
    }


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("photos")
    files = []
    for name, pixels in _photos().items():
        image = Image.fromarray(pixels)
        for quality in (50, 75, 95):
            files.append(folder / f"{name}_q{quality}.jpg")
            image.save(files[-1], quality=quality)
        files.append(folder / f"{name}.png")
        image.save(files[-1])
    return files


SIZES = (224, 300, 475)


def test_same_pixels_match_tf(tf, photo_files):
    """TF-decoded pixels through our crop + resize: within TOL of TF's pipeline, normalised or not."""
    for path in photo_files:
        pixels = tf.io.decode_image(tf.io.read_file(str(path)), channels=3, expand_animations=False).numpy()
        for size in SIZES:
            ours = pp.preprocess(pixels, size, None, None)
            assert max_diff(ours, pp.preprocess_tf(path, size, None, None)) <= TOL, (path.name, size)
        ours = pp.preprocess(pixels, 600, IMAGENET_MEAN, IMAGENET_STD, crop_padding=None)
        theirs = pp.preprocess_tf(path, 600, IMAGENET_MEAN, IMAGENET_STD, crop_padding=None)
        assert max_diff(ours, theirs) * max(IMAGENET_STD) <= TOL, path.name


def test_png_full_pipeline_matches_tf(photo_files):
    for path in (p for p in photo_files if p.suffix == ".png"):
        assert max_diff(pp.preprocess(path, 224), pp.preprocess_tf(path, 224)) * max(IMAGENET_STD) <= TOL


@pytest.fixture(scope="module")
def jpeg_variants(tmp_path_factory) -> list[Path]:
    """JPEG encodings beyond baseline 4:2:0: other chroma subsamplings, progressive, CMYK."""
    from skimage import data

    folder = tmp_path_factory.mktemp("jpeg_variants")
    coffee = Image.fromarray(data.coffee())
    rng = np.random.default_rng(3)
    cmyk = np.concatenate([data.chelsea(), rng.integers(40, 256, (*data.chelsea().shape[:2], 1))], axis=2)
    variants = {
        "coffee_444_q90.jpg": (coffee, {"quality": 90, "subsampling": 0}),
        "coffee_422_q80.jpg": (coffee, {"quality": 80, "subsampling": 1}),
        "coffee_progressive_q85.jpg": (coffee, {"quality": 85, "progressive": True}),
        "chelsea_cmyk_q90.jpg": (Image.fromarray(cmyk.astype(np.uint8), "CMYK"), {"quality": 90}),
    }
    files = []
    for name, (image, options) in variants.items():
        files.append(folder / name)
        image.save(files[-1], **options)
    return files


def _tf_default_decode(tf, path: Path) -> np.ndarray:
    return tf.io.decode_image(tf.io.read_file(str(path)), channels=3, expand_animations=False).numpy()


def test_jpeg_decoding_equals_tf_default(tf, photo_files, jpeg_variants):
    """simplejpeg with the fast IDCT decodes every JPEG to exactly TF's default pixels."""
    for path in [p for p in photo_files if p.suffix == ".jpg"] + jpeg_variants:
        ours = pp.decode_image(path)
        assert ours.dtype == np.uint8 and ours.ndim == 3 and ours.shape[2] == 3, path.name
        assert np.array_equal(ours, _tf_default_decode(tf, path)), path.name
        assert np.array_equal(pp.decode_image(path.read_bytes()), ours), path.name


def test_jpeg_full_pipeline_matches_tf(photo_files, jpeg_variants, capsys):
    """Decode + crop + resize from the file, ours vs TF's ops: within TOL on the 0-255 scale, for every image.

    Prints the figure per image (worst of 224/300/600 px), next to what PIL's decoding would give.
    """
    ours, pil = {}, {}
    for path in [p for p in photo_files if p.suffix == ".jpg"] + jpeg_variants:
        with Image.open(path) as img:
            pil_pixels = np.asarray(img.convert("RGB"))
        for size in (224, 300, 600):
            theirs = pp.preprocess_tf(path, size, None, None)
            ours[path.name] = max(ours.get(path.name, 0.0), max_diff(pp.preprocess(path, size, None, None), theirs))
            pil[path.name] = max(pil.get(path.name, 0.0), max_diff(pp.preprocess(pil_pixels, size, None, None), theirs))
    with capsys.disabled():
        print("\nJPEG -> crop -> resize, max |x - TF| on the 0-255 scale (simplejpeg decoding | PIL decoding):")
        for name in ours:
            print(f"  {name:<28} {ours[name]:.3g} | {pil[name]:.3g}")
    assert max(ours.values()) <= TOL, max(ours.items(), key=lambda kv: kv[1])


def test_pil_jpeg_is_tf_accurate_idct_not_tf_default(tf, photo_files):
    """Why simplejpeg: PIL decodes with the accurate IDCT, TF's default (the official pipeline's) is the fast one."""
    for path in (p for p in photo_files if p.suffix == ".jpg"):
        contents = tf.io.read_file(str(path))
        with Image.open(path) as img:
            pil = np.asarray(img.convert("RGB"))
        accurate = tf.io.decode_jpeg(contents, channels=3, dct_method="INTEGER_ACCURATE").numpy()
        assert np.array_equal(pil, accurate), path.name
        differ = np.abs(pil.astype(int) - _tf_default_decode(tf, path)).max()
        assert 0 < differ <= 32, path.name  # a few levels typically; up to 20 at quality 95


def test_undecodable_jpeg_falls_back_to_pil(tmp_path):
    """A file with JPEG magic that libjpeg-turbo refuses still gets PIL's verdict (here: an error)."""
    bad = tmp_path / "magic_only.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 64)
    with pytest.raises(UsageError, match="cannot read image"):
        pp.decode_image(bad)


def test_decode_and_crop_option(photo_files, tmp_path):
    """The official decode_and_crop_jpeg equals decode-then-slice when chroma is not subsampled."""
    path = tmp_path / "coffee_444.jpg"
    Image.open(next(p for p in photo_files if p.name == "coffee.png")).save(path, quality=90, subsampling=0)
    for size in (224, 600):
        assert np.array_equal(pp.preprocess_tf(path, size), pp.preprocess_tf(path, size, decode_and_crop=True))
    png = photo_files[3]
    assert np.array_equal(pp.preprocess_tf(png, 224), pp.preprocess_tf(png, 224, decode_and_crop=True))


def test_preprocess_output_shape(photo_files):
    out = pp.preprocess(photo_files[0], 240)
    assert out.shape == (240, 240, 3) and out.dtype == np.float32
