"""Digests of converted state dicts, to prove that a refactoring changes no byte of any conversion.

For an arch, a checkpoint with the official names and shapes is written by TensorFlow, each
variable's values a function of its name alone (so the checkpoint does not depend on the order
in which names are listed); it is converted to every layout, and each conversion is reduced to
one sha256 over (name, dtype, shape, sha256 of the bytes) of every tensor in the model's order.
`python -m tests.support.digests` records the digests of today's code in tests/data/conversion_digests.json.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import zlib
from pathlib import Path

import numpy as np

RECORD = Path(__file__).resolve().parents[1] / "data" / "conversion_digests.json"
LAYOUTS = ("native", "timm", "mmpretrain")
# (arch, with EMA copies, dtype): every arch raw float32; b0 also with EMA shadows and in float16.
CASES = [(a, False, "float32") for a in ("b0", "b1", "b2", "b3", "b4", "b5", "b6", "b7", "b8", "l2")] + [
    ("b0", True, "float32"),
    ("b0", False, "float16"),
]


def case_id(arch: str, ema: bool, dtype: str) -> str:
    return f"{arch}{'-ema' if ema else ''}-{dtype}"


def _values(name: str, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return rng.standard_normal(shape, dtype=np.float32)


def write_source(official_shapes: dict[str, tuple[int, ...]], ema: bool, out: Path) -> Path:
    from effconv.parity.synth import write_checkpoint

    weights = {name: _values(name, shape) for name, shape in official_shapes.items()}
    if ema:
        weights |= {f"{n}/ExponentialMovingAverage": _values(n + "/ema", s) for n, s in official_shapes.items()}
    weights["global_step"] = np.int64(1234)
    return write_checkpoint(weights, out)


def conversion_digest(src: Path, layout: str, dtype: str) -> dict:
    from effconv.convert import convert_checkpoint

    tensors: dict[str, str] = {}

    def sink(name, tensor):
        data = tensor.contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy()
        tensors[name] = f"{tensor.dtype}|{tuple(tensor.shape)}|{hashlib.sha256(data).hexdigest()}"

    result = convert_checkpoint(src, layout=layout, dtype=dtype, variant="standard", sink=sink)
    assert sorted(tensors) == sorted(result.order)
    whole = hashlib.sha256("\n".join(f"{n}|{tensors[n]}" for n in result.order).encode()).hexdigest()
    return {"sha256": whole, "tensors": len(tensors), "parameters": result.card["parameters"]}


def case_digests(arch: str, ema: bool, dtype: str, official_shapes, workdir: Path) -> dict:
    src = workdir / f"efficientnet-{arch}"
    try:
        write_source(official_shapes, ema, src)
        return {layout: conversion_digest(src, layout, dtype) for layout in LAYOUTS}
    finally:
        shutil.rmtree(src, ignore_errors=True)


if __name__ == "__main__":  # record today's digests
    import tempfile

    from effconv.models.tf_reference import official_variable_shapes

    record = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arch, ema, dtype in CASES:
            key = case_id(arch, ema, dtype)
            record[key] = case_digests(arch, ema, dtype, official_variable_shapes(arch, 1000), Path(tmp))
            print(key, record[key]["native"]["sha256"][:16], file=sys.stderr)
    RECORD.write_text(json.dumps(record, indent=1) + "\n")
