"""TF1's legacy bicubic resize (`tf.compat.v1.image.resize_bicubic`, no half-pixel centres), bit for bit.

The arithmetic, from TF's kernel: the cubic of Keys with a = -0.75, its weights looked up in a table of 1024 steps
per pixel (computed in float64, stored as float32); source coordinate = out_index * (in/out) in float32, taps at
floor-1 .. floor+2 clamped to the edge. Every output pixel is a vertical interpolation of four source rows, then a
horizontal one of the four results, each `v0*w0 + v1*w1 + v2*w2 + v3*w3` in float32, left to right, every product
and every sum rounded (no fused multiply-add).

Three ways to run it, all giving the same bits:
- `resize_reference`: the arithmetic in plain numpy, one tap at a time; the fallback and the definition.
- `resize_planar`: the fast CPU path, one pass compiled by numba (`_blocks_kernel`): both interpolations and
  mean/std on blocks of output rows that stay in cache, written straight into channels-first output. The
  compiled code is checked once against `resize_reference` on a probe; if it differs, or without numba,
  `resize_reference` runs.
- `resize_torch`: the same taps applied with torch ops on any device (separate multiply and add kernels), for
  a resize on the GPU after decoding and cropping on the CPU.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from effconv.errors import UsageError

_CUBIC_A = -0.75
_TABLE_SIZE = 1024


def _cubic_tables() -> tuple[np.ndarray, np.ndarray]:
    """Weights of the near (|t| <= 1) and far (1 < |t| <= 2) taps at t = i / 1024; float64 rounded to float32."""
    a = _CUBIC_A
    t = np.arange(_TABLE_SIZE + 1) / _TABLE_SIZE
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a
    return near.astype(np.float32), far.astype(np.float32)


_NEAR, _FAR = _cubic_tables()


@functools.lru_cache(maxsize=1024)
def axis_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices (intp) and weights (float32), out_size x 4 each, along one axis; read-only, cached.

    Source coordinate = out_index * (in/out) in float32, no half-pixel offset; taps at floor-1 .. floor+2, clamped
    to the edge; the fractional part picks a table row by round-half-even, as TF's kernel does.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    position = np.arange(out_size, dtype=np.float32) * scale
    base = np.floor(position)
    step = np.rint((position - base) * np.float32(_TABLE_SIZE)).astype(np.intp)
    flip = _TABLE_SIZE - step
    weights = np.stack([_FAR[step], _NEAR[step], _NEAR[flip], _FAR[flip]], axis=1)
    indices = np.clip(base.astype(np.intp)[:, None] + np.arange(-1, 3), 0, in_size - 1)
    indices.flags.writeable = weights.flags.writeable = False
    return indices, weights


def as_float_input(image: np.ndarray) -> np.ndarray:
    """uint8 and float32 pass as they are (uint8 * float32 is float32); anything else is cast as TF casts it."""
    return image if image.dtype in (np.uint8, np.float32) else image.astype(np.float32)


# ---- reference: plain numpy ----------------------------------------------------------------------------------


def _interpolate(image: np.ndarray, indices: np.ndarray, weights: np.ndarray, axis: int) -> np.ndarray:
    """Four-tap weighted sum along `axis`, accumulated tap by tap in float32 as TF does."""
    shape = [1] * image.ndim
    shape[axis] = -1
    out = None
    for tap in range(4):
        term = np.take(image, indices[:, tap], axis=axis) * weights[:, tap].reshape(shape)
        out = term if out is None else np.add(out, term, out=out)
    return out


def resize_reference(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """HxWxC (uint8 or float32) -> height x width x C float32: rows first, then columns, one tap at a time."""
    rows = _interpolate(image, *axis_taps(image.shape[0], height), axis=0)
    return _interpolate(rows, *axis_taps(image.shape[1], width), axis=1)


# ---- fast CPU path: one compiled pass ----------------------------------------------------------------------


def _blocks_kernel(src, rows_i, rows_w, cols_i, cols_w, shift, scale, out):  # pragma: no cover (compiled)
    """Compiled by numba (`fast_kernel`): `out[c, y, x] = (resized - shift[c]) / scale[c]`, TF's arithmetic.

    Blocks of 32 output rows: each row's vertical pass runs along the whole source row (all channels, vectorised)
    into `columns` (channel, source column, row in block); the horizontal pass then computes 32 rows of one
    output column at once from four `columns` rows, into `tile` (output column, row in block), which is copied
    into the block's output rows. Every product and sum is rounded to float32 in TF's order (numba compiles
    without fast-math, so nothing is fused or reordered).
    """
    in_h, in_w, channels = src.shape
    height, width = out.shape[1], out.shape[2]
    flat = src.reshape(in_h, in_w * channels)
    row = np.empty(in_w * channels, np.float32)
    columns = np.zeros((channels, in_w, _KERNEL_ROWS), np.float32)  # a last short block reads rows it leaves
    tile = np.empty((width, _KERNEL_ROWS), np.float32)
    for top in range(0, height, _KERNEL_ROWS):
        rows = min(_KERNEL_ROWS, height - top)
        for j in range(rows):
            y = top + j
            r0, r1, r2, r3 = flat[rows_i[y, 0]], flat[rows_i[y, 1]], flat[rows_i[y, 2]], flat[rows_i[y, 3]]
            w0, w1, w2, w3 = rows_w[y, 0], rows_w[y, 1], rows_w[y, 2], rows_w[y, 3]
            for k in range(in_w * channels):
                row[k] = ((np.float32(r0[k]) * w0 + np.float32(r1[k]) * w1) + np.float32(r2[k]) * w2) + np.float32(
                    r3[k]
                ) * w3
            for x in range(in_w):
                for c in range(channels):
                    columns[c, x, j] = row[x * channels + c]
        for c in range(channels):
            source, minus, over = columns[c], shift[c], scale[c]
            for x in range(width):
                k0, k1, k2, k3 = cols_i[x, 0], cols_i[x, 1], cols_i[x, 2], cols_i[x, 3]
                u0, u1, u2, u3 = cols_w[x, 0], cols_w[x, 1], cols_w[x, 2], cols_w[x, 3]
                target = tile[x]
                for j in range(_KERNEL_ROWS):
                    value = ((source[k0, j] * u0 + source[k1, j] * u1) + source[k2, j] * u2) + source[k3, j] * u3
                    target[j] = (value - minus) / over
            for j in range(rows):
                line = out[c, top + j]
                for x in range(width):
                    line[x] = tile[x, j]


# Output rows per block of the compiled pass (its buffers stay in the L2 cache; 32-64 measure alike, 8-24 slower).
_KERNEL_ROWS = 32


@functools.lru_cache(maxsize=1024)
def _kernel_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    indices, weights = axis_taps(in_size, out_size)
    return np.ascontiguousarray(indices, dtype=np.int32), weights


def _compile(function, cache: bool):
    import numba

    # error_model="numpy": x / 0 is inf or nan as in numpy, torch and TF, not a ZeroDivisionError
    return numba.njit(cache=cache, nogil=True, boundscheck=False, error_model="numpy")(function)


def _rounds_like_tf(kernel) -> bool:
    """Whether `kernel` gives `resize_reference`'s bits on a probe (edges clamped, up and down, mean/std)."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (23, 37, 3), dtype=np.uint8)
    image[:4] = 0  # products of zero with negative weights: the sign of zero must come out as TF's
    shift, scale = np.float32([123.675, 0.0, 103.53]), np.float32([58.395, 1.0, 57.375])
    floats = image.astype(np.float32) * np.float32(1.7) - np.float32(40)  # float input, negative values too
    for source, (height, width) in ((image, (41, 19)), (image, (7, 64)), (floats, (30, 30))):
        expected = (resize_reference(source, height, width) - shift) / scale
        got = np.empty((3, height, width), np.float32)
        try:
            kernel(source, *_kernel_taps(23, height), *_kernel_taps(37, width), shift, scale, got)
        except Exception:  # a kernel that does not compile or run here: not the one this module knows
            return False
        if not np.array_equal(got.view(np.uint32), np.ascontiguousarray(expected.transpose(2, 0, 1)).view(np.uint32)):
            return False
    return True


@functools.cache
def fast_kernel():
    """The compiled kernel, checked on a probe; None when the numpy reference must run (looked up once).

    Compiled code is cached on disk by numba where it can write (beside this module, or the user's cache folder);
    where it cannot, each process compiles it again (about a second).
    """
    try:
        import numba
    except ImportError:  # numba is a dependency; a platform without it still gets the right bits, slower
        return None
    if numba.config.DISABLE_JIT:  # NUMBA_DISABLE_JIT=1: the kernel would run as Python, far slower than numpy
        return None
    for cache in (True, False):
        try:
            kernel = _compile(_blocks_kernel, cache)
        except RuntimeError:  # "cannot cache function": no writable cache folder
            continue
        if _rounds_like_tf(kernel):
            return kernel
    return None


def kernel_name() -> str:
    """Which CPU path `resize_planar` takes here, for benchmarks and bug reports."""
    return "numba (compiled blocks)" if fast_kernel() is not None else "numpy reference"


def resize_planar(
    image: np.ndarray,
    height: int,
    width: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> np.ndarray:
    """HxWxC image -> C x height x width float32, contiguous; then (x - mean) / std where either is given.

    uint8 and float32 are taken as they are, other dtypes cast to float32 as TF casts them. `mean` and `std`: one
    number for every channel or one per channel (a missing one is 0 or 1). Bit-identical to `resize_reference`
    (channels first), so to TF.
    """
    image = as_float_input(np.asarray(image))
    channels = image.shape[2]
    shift = _per_channel(0.0 if mean is None else mean, channels, "mean")
    scale = _per_channel(1.0 if std is None else std, channels, "std")
    kernel = fast_kernel()
    if kernel is None:
        out = np.ascontiguousarray(resize_reference(image, height, width).transpose(2, 0, 1))
        if mean is not None or std is not None:
            _normalise(out, shift, scale)
        return out
    # (x - 0) / 1 is x, bit for bit (-0.0 included): one kernel with and without normalisation
    out = np.empty((channels, height, width), np.float32)
    source = np.ascontiguousarray(image)
    kernel(source, *_kernel_taps(image.shape[0], height), *_kernel_taps(image.shape[1], width), shift, scale, out)
    return out


def _per_channel(value, channels: int, what: str) -> np.ndarray:
    """A mean or std as float32 per channel: one number for all, or one per channel."""
    array = np.asarray(value, dtype=np.float32).reshape(-1)
    if array.size == 1:
        return np.repeat(array, channels)
    if array.size != channels:
        raise UsageError(f"{what} has {array.size} values for an image of {channels} channels")
    return array


def _normalise(planar: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> None:
    """(x - mean) / std per channel of a channels-first array, in place, in float32."""
    shape = (-1,) + (1,) * (planar.ndim - 1)
    np.subtract(planar, np.asarray(mean, dtype=np.float32).reshape(shape), out=planar)
    np.divide(planar, np.asarray(std, dtype=np.float32).reshape(shape), out=planar)


# ---- torch, any device -----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _torch_taps(in_size: int, out_size: int, device: str):
    import torch

    indices, weights = axis_taps(in_size, out_size)
    return (
        torch.from_numpy(np.array(indices.T, dtype=np.int64, order="C")).to(device),
        torch.from_numpy(np.array(weights.T, order="C")).to(device),
    )


def _interpolate_torch(image, indices, weights, dim: int):
    shape = [1] * image.dim()
    shape[dim] = -1
    out = None
    for tap in range(4):
        term = image.index_select(dim, indices[tap]) * weights[tap].view(shape)
        out = term if out is None else out.add_(term)
    return out


def resize_torch(image, height: int, width: int):
    """HxWxC tensor (any dtype, any device) -> C x height x width float32 on the same device, contiguous.

    Separate multiply and add kernels in TF's order, so the bits equal `resize_planar`'s on CPU and GPU alike.
    """
    import torch

    planar = image.permute(2, 0, 1)
    if planar.dtype not in (torch.uint8, torch.float32):
        planar = planar.float()  # as TF casts; uint8 * float32 already gives float32
    device = str(image.device)
    rows = _interpolate_torch(planar, *_torch_taps(image.shape[0], height, device), dim=1)
    return _interpolate_torch(rows, *_torch_taps(image.shape[1], width, device), dim=2)


def normalise_torch(planar, mean: Sequence[float], std: Sequence[float]):
    """(x - mean) / std per channel of a channels-first tensor, in place, in float32."""
    import torch

    shape = (-1,) + (1,) * (planar.dim() - 1)
    planar.sub_(torch.tensor(mean, dtype=torch.float32, device=planar.device).view(shape))
    return planar.div_(torch.tensor(std, dtype=torch.float32, device=planar.device).view(shape))
