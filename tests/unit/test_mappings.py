from __future__ import annotations

import json

import numpy as np
import pytest

from effconv.errors import MappingError
from effconv.mappings import engine, transforms
from effconv.mappings.official import EMA_SUFFIX
from effconv.models import spec
from effconv.models.efficientnet import model_tensor_shapes


def fixture_variables(fixture_dir) -> dict[str, tuple[int, ...]]:
    out = {}
    for line in (fixture_dir / "variables.txt").read_text().splitlines():
        name, shape, _ = line.split("\t")
        out[name] = tuple(json.loads(shape))
    return out


def test_b0_plan_uses_exactly_the_official_variables(fixture_dir):
    variables = fixture_variables(fixture_dir)
    model_vars = {n for n in variables if not n.endswith(EMA_SUFFIX) and n != "global_step"}
    plan = engine.official_plan("b0", 1000, "efficientnet-b0")
    assert {m.source for m in plan} == model_vars
    assert len(plan) == len(model_vars) == 311
    shapes, _ = model_tensor_shapes("b0", 1000)
    engine.check_plan(plan, variables, {k: v for k, v in shapes.items() if "num_batches" not in k})


@pytest.mark.parametrize("arch", spec.ARCH_NAMES)
def test_plan_fills_every_model_tensor_once(arch):
    plan = engine.official_plan(arch, 1000, f"efficientnet-{arch}")
    shapes, _ = model_tensor_shapes(arch, 1000)
    targets = [m.target for m in plan]
    assert len(targets) == len(set(targets))
    assert set(targets) == {k for k in shapes if not k.endswith("num_batches_tracked")}
    assert len({m.source for m in plan}) == len(plan)


def test_every_expand_ratio_1_block_uses_shifted_scopes():
    plan = engine.official_plan("b5", 1000, "p", "batch_normalization")
    by_target = {m.target: m.source for m in plan}
    for block in spec.blocks("b5")[:3]:  # b5 has three expand-ratio-1 blocks
        i = block.index
        assert f"blocks.{i}.expand_conv.weight" not in by_target
        assert by_target[f"blocks.{i}.project_conv.weight"] == f"p/blocks_{i}/conv2d/kernel"
        assert by_target[f"blocks.{i}.project_bn.running_var"] == f"p/blocks_{i}/batch_normalization_1/moving_variance"
    assert by_target["blocks.3.project_conv.weight"] == "p/blocks_3/conv2d_1/kernel"
    assert by_target["blocks.3.dw_bn.weight"] == "p/blocks_3/batch_normalization_1/gamma"


def test_headless_plan_has_no_classifier():
    plan = engine.official_plan("b0", 0, "efficientnet-b0")
    assert not any(m.target.startswith("classifier") for m in plan)


def test_check_plan_reports_missing_and_misshaped(fixture_dir):
    variables = fixture_variables(fixture_dir)
    plan = engine.official_plan("b0", 1000, "efficientnet-b0")
    shapes, _ = model_tensor_shapes("b0", 1000)
    targets = {k: v for k, v in shapes.items() if "num_batches" not in k}
    gone = dict(variables)
    del gone["efficientnet-b0/blocks_7/se/conv2d/bias"]
    with pytest.raises(MappingError, match="lacks 1 variables.*blocks_7/se/conv2d/bias"):
        engine.check_plan(plan, gone, targets)
    bent = dict(variables)
    bent["efficientnet-b0/head/dense/kernel"] = (1000, 1280)
    with pytest.raises(MappingError, match="head/dense/kernel has shape"):
        engine.check_plan(plan, bent, targets)


def test_transforms_move_axes_like_pytorch_expects():
    hwio = np.arange(3 * 5 * 2 * 4).reshape(3, 5, 2, 4)
    oihw = transforms.apply("conv", hwio)
    assert oihw.shape == (4, 2, 3, 5) and oihw[1, 0, 2, 3] == hwio[2, 3, 0, 1]
    assert oihw.flags.c_contiguous
    dw = np.arange(3 * 3 * 6).reshape(3, 3, 6, 1)
    assert transforms.apply("depthwise", dw)[4, 0, 1, 2] == dw[1, 2, 4, 0]
    assert transforms.apply("dense", np.zeros((7, 3))).shape == (3, 7)
    assert transforms.target_shape("conv", (3, 3)) is None


def test_unused_variables_get_reasons():
    reasons = engine.classify_unused(["global_step", "a/kernel/RMSProp", "a/kernel/RMSProp_1", "odd"])
    assert reasons == {
        "global_step": "training counter",
        "a/kernel/RMSProp": "optimizer slot",
        "a/kernel/RMSProp_1": "optimizer slot",
        "odd": "unknown variable",
    }


@pytest.mark.parametrize(
    "transform, shape",
    [
        ("conv", (1, 1, 300, 700)),  # tiled, ragged last tiles
        ("conv", (1, 1, 257, 1000)),
        ("dense", (1000, 300)),
        ("dense", (257, 257)),
        ("conv", (3, 3, 300, 400)),  # not a matrix transpose: one strided copy
        ("depthwise", (5, 5, 600, 1)),
        ("conv", (1, 1, 3, 5)),
    ],
)
def test_layout_transposes_equal_numpy_into_fresh_or_given_memory(transform, shape):
    a = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    expected = np.ascontiguousarray(a.transpose(transforms.PERMUTATIONS[transform]))
    fresh = transforms.apply(transform, a)
    given = np.full(expected.shape, np.nan, dtype=np.float32)
    assert transforms.apply(transform, a, out=given) is given
    for got in (fresh, given):
        assert got.flags.c_contiguous and np.array_equal(got, expected)


def test_expert_kernels_become_flat_oihw_rows():
    """CondConv: each expert's flat HWIO (or [k, k, C, 1] depthwise) kernel becomes a flat OIHW row."""
    rng = np.random.default_rng(0)
    conv = rng.standard_normal((4, 3 * 3 * 5 * 7), dtype=np.float32)
    out = transforms.apply("expert_conv:3:7", conv)
    assert out.shape == (4, 7 * 5 * 3 * 3) and transforms.target_shape("expert_conv:3:7", conv.shape) == out.shape
    for e in range(4):
        assert np.array_equal(out[e], transforms.apply("conv", conv[e].reshape(3, 3, 5, 7)).reshape(-1))
    dw = rng.standard_normal((8, 5 * 5 * 6), dtype=np.float32)
    out = transforms.apply("expert_depthwise:5", dw)
    assert np.array_equal(out[3], transforms.apply("depthwise", dw[3].reshape(5, 5, 6, 1)).reshape(-1))
    assert transforms.target_shape("expert_conv:3:7", (4, 100)) is None  # not 3 * 3 * in * 7
    assert not transforms.is_copy("expert_depthwise:5") and transforms.is_copy("copy")
