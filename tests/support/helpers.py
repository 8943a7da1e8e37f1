"""Small helpers shared by tests (not fixtures)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import torch
from click.testing import CliRunner

from effconv.cli import main


def run_cli(*args: str):
    """Invoke the CLI in-process; returns click's Result (exit_code, stdout, stderr)."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def nchw(x_nhwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))


def _float64(a) -> np.ndarray:
    return np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a, dtype=np.float64)


def max_abs(a, b) -> float:
    return float(np.abs(_float64(a) - _float64(b)).max())


# The float32 tolerance of every test that compares two float32 computations of the same thing (TF vs
# PyTorch, our TF reference vs the official code, NCHW vs channels-last, PyTorch vs onnxruntime or Keras):
# max|actual - ref| <= atol + rtol * max|ref|, as `effconv verify` judges logits. Kernels that sum in another
# order (TensorFlow's oneDNN on or off, Intel or AMD CPUs, another memory layout) round differently, by an
# amount proportional to the magnitudes involved, so no fixed absolute limit holds for every output: on an AMD
# EPYC the official-b0 RAW logits (max|.| 62) come out 2.6e-4 from the fixture's with TF_ENABLE_ONEDNN_OPTS=1
# (1.2e-4 with =0; relative 4e-6), the EMA logits (max 6.9) 2.6e-5. Measured there on the fixture's inputs, with
# oneDNN on and off, every such difference is at most 1.3e-5 of max|ref|; the largest, PyTorch vs the official: head_1x1
# 2.1e-4 (max 18), EMA logits 7.8e-5 (max 6.9), pooled features 5.2e-5 (max 4.0). FLOAT32_RTOL = 2e-5 keeps
# a margin of about 2 over that; FLOAT32_ATOL = 1e-5 is a floor for outputs near zero, whose rounding comes
# from the larger activations that produce them. The EMA logits' limit is then 1.5e-4 (it was 1e-4 absolute).
# Networks with random weights shrink their activations to ~1e-12: compare those with atol=0.
FLOAT32_ATOL = 1e-5
FLOAT32_RTOL = 2e-5


def tolerance(ref, *, atol: float = FLOAT32_ATOL, rtol: float = FLOAT32_RTOL) -> float:
    """atol + rtol * max|ref|: `ref` is the reference array, or its max |value| (a figure from a report)."""
    ref = _float64(ref)
    return atol + rtol * (float(np.abs(ref).max()) if ref.size else 0.0)


def assert_close(actual, ref, *, atol: float = FLOAT32_ATOL, rtol: float = FLOAT32_RTOL, what: str = ""):
    """Assert max|actual - ref| <= atol + rtol * max|ref| (see FLOAT32_RTOL); returns (max diff, limit)."""
    actual, ref = _float64(actual), _float64(ref)
    assert actual.shape == ref.shape, f"{what}: shape {actual.shape} != {ref.shape}"
    diff, limit = max_abs(actual, ref), tolerance(ref, atol=atol, rtol=rtol)
    assert diff <= limit, (
        f"{what}: max|diff| {diff:.3g} > limit {limit:.3g} = {atol:g} + {rtol:g} * max|ref| {np.abs(ref).max():.3g}"
    )
    return diff, limit


TIMM_PYTHON = Path(__file__).resolve().parents[2] / ".venv-timm" / "bin" / "python"
LIBRARY_SIDE = Path(__file__).with_name("library_side.py")


def run_library_side(folder: Path) -> str:
    """Run `folder`/jobs.json through the real libraries in .venv-timm (library_side.py); results land in `folder`.

    Returns what the library side printed (stdout, then stderr)."""
    proc = subprocess.run(
        [str(TIMM_PYTHON), str(LIBRARY_SIDE), str(folder / "jobs.json"), str(folder)],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, f"library side failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    print(proc.stdout)
    return proc.stdout + proc.stderr
