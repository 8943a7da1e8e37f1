"""Layout changes from TF tensors to PyTorch tensors, by name."""

from __future__ import annotations

import numpy as np

# TF layout -> PyTorch layout, as a permutation of axes (None: unchanged).
PERMUTATIONS: dict[str, tuple[int, ...] | None] = {
    "conv": (3, 2, 0, 1),  # HWIO -> OIHW
    "depthwise": (2, 3, 0, 1),  # [k, k, C, 1] -> [C, 1, k, k]
    "dense": (1, 0),  # [in, out] -> [out, in]
    "copy": None,
}


def apply(transform: str, array: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The PyTorch-layout copy of `array` (C-contiguous), written into `out` when given."""
    perm = PERMUTATIONS[transform]
    if perm is None:
        return array
    if out is None:
        return np.ascontiguousarray(array.transpose(perm))
    np.copyto(out, array.transpose(perm))
    return out


def target_shape(transform: str, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape `apply` gives a tensor of `shape`; None when the rank does not fit."""
    perm = PERMUTATIONS[transform]
    if perm is None:
        return tuple(shape)
    if len(shape) != len(perm):
        return None
    return tuple(shape[p] for p in perm)


def source_shape(transform: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The TF shape that `apply` turns into `shape` (the inverse of `target_shape`)."""
    perm = PERMUTATIONS[transform]
    if perm is None:
        return tuple(shape)
    out = [0] * len(perm)
    for axis, p in enumerate(perm):
        out[p] = shape[axis]
    return tuple(out)
