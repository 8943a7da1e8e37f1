"""TF1's legacy bicubic resize (`tf.compat.v1.image.resize_bicubic`, no half-pixel centres), bit for bit.

The arithmetic, from TF's kernel: the cubic of Keys with a = -0.75, its weights looked up in a table of 1024 steps
per pixel (computed in float64, stored as float32); source coordinate = out_index * (in/out) in float32, taps at
floor-1 .. floor+2 clamped to the edge. Every output pixel is a vertical interpolation of four source rows, then a
horizontal one of the four results, each `v0*w0 + v1*w1 + v2*w2 + v3*w3` in float32, left to right, every product
and every sum rounded (no fused multiply-add).

Three ways to run it, all giving the same bits:
- `resize_reference`: the arithmetic in plain numpy, one tap at a time; the fallback and the definition.
- `resize_planar`: the fast CPU path. Both passes are sparse matrix products (CSR, four entries a row in tap
  order) computed by scipy's `csr_matvecs`, which accumulates `y += a * x` entry by entry into a zeroed row: for
  each output row `(((0 + p0) + p1) + p2) + p3`, which is TF's sum. The first pass runs over source rows; its
  result is transposed block by block so that the second runs over source columns, and the second's result
  (columns first) is transposed into channels-first output, normalised while it is in cache. Whether the
  installed scipy rounds as TF does (a build that fuses `y + a * x` into one FMA would not) is checked once, on
  a probe; if not, or without scipy, `resize_reference` is used.
- `resize_torch`: the same taps applied with torch ops on any device (separate multiply and add kernels), for
  a resize on the GPU after decoding and cropping on the CPU.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

_CUBIC_A = -0.75
_TABLE_SIZE = 1024

# Output rows per block of the fast path, so that its intermediate arrays stay in the L2 cache (32-96 measure alike).
_BLOCK_ROWS = 64


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


# ---- fast CPU path: two sparse passes --------------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def _csr_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The taps as the column indices (int32) and values (float32) of a CSR matrix with 4 entries a row."""
    indices, weights = axis_taps(in_size, out_size)
    return np.ascontiguousarray(indices, dtype=np.int32).ravel(), np.ascontiguousarray(weights).ravel()


@functools.lru_cache(maxsize=64)
def _row_pointers(rows: int) -> np.ndarray:
    return np.arange(0, 4 * rows + 1, 4, dtype=np.int32)


def _sparse_rows_kernel():
    """scipy's CSR x dense kernel, `csr_matvecs(n_row, n_col, n_vecs, Ap, Aj, Ax, X, Y)`: Y += A @ X, row by row."""
    try:
        from scipy.sparse._sparsetools import csr_matvecs
    except ImportError:  # no scipy, or a scipy that moved its private kernels: the reference path
        return None
    return csr_matvecs


def _rounds_like_tf(kernel) -> bool:
    """Whether `kernel` sums rounded products in tap order, on values where a fused multiply-add would differ."""
    rng = np.random.default_rng(0)
    rows, cols, vecs = 64, 40, 24
    x = (rng.random((cols, vecs)) * 255).astype(np.float32)
    columns = np.clip(rng.integers(-1, cols + 1, (rows, 4)), 0, cols - 1)
    columns[:4, :2] = 0  # clamped edge taps repeat a column: each entry must still count once, in order
    weights = (rng.random((rows, 4)) * 1.5 - 0.25).astype(np.float32)
    expected = np.zeros((rows, vecs), np.float32)
    for tap in range(4):
        expected = expected + x[columns[:, tap]] * weights[:, tap, None]
    got = np.zeros((rows, vecs), np.float32)
    try:
        kernel(rows, cols, vecs, _row_pointers(rows), columns.astype(np.int32).ravel(), weights.ravel(), x.ravel(),
               got.ravel())  # fmt: skip
    except Exception:  # a changed signature: not the kernel this module knows
        return False
    return np.array_equal(got.view(np.uint32), expected.view(np.uint32))


@functools.cache
def fast_kernel():
    """The checked sparse kernel, or None when the reference path must be used (looked up once)."""
    kernel = _sparse_rows_kernel()
    return kernel if kernel is not None and _rounds_like_tf(kernel) else None


def kernel_name() -> str:
    """Which CPU path `resize_planar` takes here, for benchmarks and bug reports."""
    return "scipy sparse (csr_matvecs)" if fast_kernel() is not None else "numpy reference"


def resize_planar(
    image: np.ndarray,
    height: int,
    width: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> np.ndarray:
    """HxWxC (uint8 or float32) -> C x height x width float32, contiguous; (x - mean) / std when mean and std given.

    Bit-identical to `resize_reference` (channels first), so to TF.
    """
    kernel = fast_kernel()
    if kernel is not None:
        return _resize_sparse(kernel, image, height, width, mean, std)
    out = np.ascontiguousarray(resize_reference(image, height, width).transpose(2, 0, 1))
    if mean is not None:
        _normalise(out, mean, std)
    return out


def _resize_sparse(kernel, image: np.ndarray, height: int, width: int, mean, std) -> np.ndarray:
    """Blocks of output rows: rows pass, transpose, columns pass, transpose into the output (normalised there)."""
    in_h, in_w, channels = image.shape
    source = np.ascontiguousarray(image, dtype=np.float32).ravel()
    rows_taps, cols_taps = _csr_taps(in_h, height), _csr_taps(in_w, width)
    block = min(_BLOCK_ROWS, height)
    rows = np.empty(block * in_w * channels, np.float32)  # a block of the first pass: block x in_w x C
    columns = np.empty_like(rows)  # the same, transposed: in_w x C x block
    second = np.empty(width * channels * block, np.float32)  # the second pass: width x C x block
    out = np.empty((channels, height, width), np.float32)
    shift = None if mean is None else np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
    scale = None if mean is None else np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
    for top in range(0, height, block):
        n = min(block, height - top)
        taps = slice(4 * top, 4 * (top + n))
        first = rows[: n * in_w * channels]
        first.fill(0)  # the kernel adds into its output
        kernel(n, in_h, in_w * channels, _row_pointers(n), rows_taps[0][taps], rows_taps[1][taps], source, first)
        transposed = columns[: in_w * channels * n].reshape(in_w, channels, n)
        np.copyto(transposed, first.reshape(n, in_w, channels).transpose(1, 2, 0))
        result = second[: width * channels * n]
        result.fill(0)
        kernel(width, in_w, channels * n, _row_pointers(width), *cols_taps, transposed.ravel(), result)
        result = result.reshape(width, channels, n).transpose(1, 2, 0)
        target = out[:, top : top + n]
        if shift is None:
            np.copyto(target, result)
        else:  # while the block is in cache: (x - mean) / std, as `preprocess.normalize` computes it
            np.subtract(result, shift, out=target)
            np.divide(target, scale, out=target)
    return out


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
