"""Issue 11 §1: `verify --weights` takes the file a user ships, in every layout, format and dtype.

The tolerance follows the card's dtype (`DTYPE_TOLERANCES`: derived from the float16 / bfloat16 error measured
on this fixture), the report says which dtype was checked, and a user's --atol/--rtol still wins.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from effconv.parity.verify import DTYPE_TOLERANCES, resolve_tolerance
from tests.support.helpers import run_cli


def _convert(src, out, *args) -> None:
    result = run_cli("convert", "--src", src, "--out", out, "--variant", "standard", "-q", *args)
    assert result.exit_code == 0, result.output


def _verify(src, weights, report, *args):
    return run_cli("verify", "--src", src, "--weights", weights, "--report", report, "--batch", "1", *args)


@pytest.mark.parametrize(
    ("layout", "suffix", "dtype"),
    [
        ("timm", ".pth", "float32"),
        ("timm", ".safetensors", "float16"),
        ("mmpretrain", ".pth", "bfloat16"),
        ("mmpretrain", ".safetensors", "float32"),
        ("native", ".safetensors", "float16"),
    ],
)
def test_verify_takes_every_layout_format_and_dtype(fixture_ckpt, tmp_path, layout, suffix, dtype):
    out = tmp_path / f"b0{suffix}"
    _convert(fixture_ckpt, out, "--layout", layout, "--dtype", dtype)
    per_layer = ("--per-layer",) if dtype != "float32" else ()  # every layer within the dtype's tolerance too
    result = _verify(fixture_ckpt, out, tmp_path / "r.json", *per_layer)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    atol, rtol = DTYPE_TOLERANCES[dtype]
    assert report["dtype"] == dtype and report["tolerance_from"] == f"the {dtype} default"
    assert (report["atol"], report["rtol"]) == (atol, rtol) and report["tolerance"].startswith(f"{dtype} weights")
    case = report["cases"][0]
    assert case["passed"] and case["top1_agreement"] == 1.0
    if dtype != "float32":  # measured: what the default is derived from, with its margin
        logits = case["logits"]
        print(f"{layout}{suffix} {dtype}: logits max|diff| {logits['max_abs']:.3g} of max {logits['ref_absmax']:.3g}")
        assert logits["max_abs"] > atol  # the rounding shows: the float32 default would have failed it
        assert max(layer["max_abs"] / layer["tolerance"] for layer in case["layers"]) < 0.75


def test_user_tolerance_wins_over_the_dtype_default(fixture_ckpt, tmp_path):
    out = tmp_path / "b0.pth"
    _convert(fixture_ckpt, out, "--dtype", "float16")
    result = _verify(fixture_ckpt, out, tmp_path / "r.json", "--atol", "1e-3")
    assert result.exit_code == 1, result.output  # 0.0239 > 1e-3: the user asked for float32's limit
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["tolerance_from"] == "--atol/--rtol given" and (report["atol"], report["rtol"]) == (1e-3, 1e-4)
    result = _verify(fixture_ckpt, out, tmp_path / "r.json", "--rtol", "0.1")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r.json").read_text())["rtol"] == 0.1


def test_resolve_tolerance():
    assert resolve_tolerance("float16", None, None) == (1e-3, 32 * 2.0**-10, "the float16 default")
    assert resolve_tolerance("bfloat16", None, None)[1] == 0.25
    assert resolve_tolerance(None, None, None) == (1e-3, 1e-4, "the float32 default")  # a card from before dtypes
    assert resolve_tolerance("bfloat16", 0.5, None) == (0.5, 1e-4, "--atol/--rtol given")
    assert resolve_tolerance("float16", None, 0.2) == (1e-3, 0.2, "--atol/--rtol given")


def test_predict_takes_a_timm_half_precision_file(fixture_ckpt, tmp_path):
    from PIL import Image

    image = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 300, 3), dtype=np.uint8)).save(image)
    tops = {}
    for layout, dtype in (("native", "float32"), ("timm", "float16"), ("mmpretrain", "bfloat16")):
        out = tmp_path / f"b0-{layout}.safetensors"
        _convert(fixture_ckpt, out, "--layout", layout, "--dtype", dtype)
        result = run_cli("predict", "--weights", out, image, "--json", "--top-k", "1")
        assert result.exit_code == 0, result.output
        tops[layout] = json.loads(result.stdout)[0]["top_k"][0]["label"]
    assert tops["timm"] == tops["native"] == tops["mmpretrain"]
