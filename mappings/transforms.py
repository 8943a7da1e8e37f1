"""Layout changes from TF tensors to PyTorch tensors, by name.

A transform is a name, optionally with integer arguments after colons: `expert_conv:K:OUT` and
`expert_depthwise:K` turn CondConv expert kernels, one flattened TF kernel per row ([experts,
K*K*IN*OUT] of HWIO, [experts, K*K*C] of a [K, K, C, 1] depthwise kernel), into one flattened PyTorch
kernel per row (OIHW); the flat shape does not say the geometry, so the transform carries it.
"""

from __future__ import annotations

import numpy as np

# TF layout -> PyTorch layout, as a permutation of axes (None: unchanged).
PERMUTATIONS: dict[str, tuple[int, ...] | None] = {
    "conv": (3, 2, 0, 1),  # HWIO -> OIHW
    "depthwise": (2, 3, 0, 1),  # [k, k, C, 1] -> [C, 1, k, k]
    "dense": (1, 0),  # [in, out] -> [out, in]
    "copy": None,
}


# Expert transforms: the permutation of (experts, *TF kernel) to (experts, *PyTorch kernel).
EXPERT_PERMUTATIONS: dict[str, tuple[int, ...]] = {
    "expert_conv": (0, 4, 3, 1, 2),  # [E, kh, kw, in, out] -> [E, out, in, kh, kw]
    "expert_depthwise": (0, 3, 4, 1, 2),  # [E, kh, kw, C, 1] -> [E, C, 1, kh, kw]
}


def _parse(transform: str) -> tuple[str, tuple[int, ...]]:
    name, *args = transform.split(":")
    return name, tuple(int(a) for a in args)


def is_copy(transform: str) -> bool:
    """True when the transform leaves the tensor as it is."""
    name, _ = _parse(transform)
    return name not in EXPERT_PERMUTATIONS and PERMUTATIONS[name] is None


def _expert_view(name: str, args: tuple[int, ...], shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The (experts, *TF kernel) shape of a flattened expert tensor of `shape`; None if it does not divide."""
    if len(shape) != 2:
        return None
    experts, flat = shape
    kernel, out = (args[0], args[1]) if name == "expert_conv" else (args[0], 1)
    per_in = kernel * kernel * out
    if flat % per_in:
        return None
    return (experts, kernel, kernel, flat // per_in, out)


TILE = 256  # a 256 x 256 float32 tile is 256 kB: both sides stay in cache


def apply(transform: str, array: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The PyTorch-layout copy of `array` (C-contiguous), written into `out` when given."""
    name, args = _parse(transform)
    if name in EXPERT_PERMUTATIONS:
        view = _expert_view(name, args, array.shape)
        if view is None:
            raise ValueError(f"a {list(array.shape)} tensor is not a set of {transform} kernels")
        if out is None:
            out = np.empty(array.shape, dtype=array.dtype)
        np.copyto(
            out.reshape(tuple(view[p] for p in EXPERT_PERMUTATIONS[name])),
            array.reshape(view).transpose(EXPERT_PERMUTATIONS[name]),
        )
        return out
    perm = PERMUTATIONS[name]
    if perm is None:
        return array
    if out is None:
        out = np.empty(target_shape(transform, array.shape), dtype=array.dtype)
    rows, cols = array.shape[-2:]
    if array.size == rows * cols and perm[0] == array.ndim - 1 and rows > TILE and cols > TILE:
        # A matrix transpose in disguise (dense, 1x1 conv): by tiles, which runs 2-4x faster on
        # the large ones than one strided copy (each output row would touch every source page).
        _transpose_tiled(array.reshape(rows, cols), out.reshape(cols, rows))
    else:
        np.copyto(out, array.transpose(perm))
    return out


def _transpose_tiled(src: np.ndarray, dst: np.ndarray) -> None:
    rows, cols = src.shape
    for i in range(0, rows, TILE):
        band, dst_band = src[i : i + TILE], dst[:, i : i + TILE]
        for j in range(0, cols, TILE):
            np.copyto(dst_band[j : j + TILE], band[:, j : j + TILE].T)


def target_shape(transform: str, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape `apply` gives a tensor of `shape`; None when the rank does not fit."""
    name, args = _parse(transform)
    if name in EXPERT_PERMUTATIONS:
        return tuple(shape) if _expert_view(name, args, tuple(shape)) is not None else None
    perm = PERMUTATIONS[name]
    if perm is None:
        return tuple(shape)
    if len(shape) != len(perm):
        return None
    return tuple(shape[p] for p in perm)


def source_shape(transform: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The TF shape that `apply` turns into `shape` (the inverse of `target_shape`)."""
    name, _ = _parse(transform)
    if name in EXPERT_PERMUTATIONS:
        return tuple(shape)
    perm = PERMUTATIONS[name]
    if perm is None:
        return tuple(shape)
    out = [0] * len(perm)
    for axis, p in enumerate(perm):
        out[p] = shape[axis]
    return tuple(out)
