"""EfficientNet-Lite and -EdgeTPU against the official code's own outputs (the official-lite0 / -edgetpu-s fixtures)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from effconv.convert import convert_checkpoint
from effconv.errors import UsageError
from effconv.models import create_model, spec
from tests.conftest import PROJECT_ROOT
from tests.support.helpers import assert_close, max_abs, nchw, run_cli

FIXTURES = PROJECT_ROOT.parent / "shared" / "fixtures"
EMA = "/ExponentialMovingAverage"
# fixture -> (arch, family, official prefix)
CASES = {
    "official-lite0": ("lite0", "lite", "efficientnet-lite0"),
    "official-edgetpu-s": ("edgetpu-s", "edgetpu", "efficientnet-edgetpu-S"),
    "official-condconv-b0-4e": ("condconv-b0-4e", "condconv", "efficientnet-condconv-b0-4e"),
    "official-v2-b0": ("v2-b0", "v2", "efficientnetv2-b0"),
}
# Parameters with the released heads (Lite 1000 classes, EdgeTPU 1001 with the background class), from the
# built PyTorch model; lite0 and edgetpu-s are checked against the fixtures' variables below.
PARAMETERS = {
    ("lite0", 1000): 4_652_008,
    ("lite1", 1000): 5_416_680,
    ("lite2", 1000): 6_092_072,
    ("lite3", 1000): 8_197_096,
    ("lite4", 1000): 13_006_568,
    ("edgetpu-s", 1001): 5_439_673,
    ("edgetpu-m", 1001): 6_900_777,
    ("edgetpu-l", 1001): 10_591_249,
    # CondConv and EfficientNetV2 (1000 classes; V2's ImageNet-21k releases have 21,843): each equals timm's
    # published count (tf_efficientnet_cc_b0_4e 13.31M ... tf_efficientnetv2_xl 208.12M, README table)
    ("condconv-b0-4e", 1000): 13_314_116,
    ("condconv-b0-8e", 1000): 24_013_284,
    ("condconv-b0-8e-depth", 1000): 39_715_968,
    ("v2-b0", 1000): 7_139_704,
    ("v2-b1", 1000): 8_141_052,
    ("v2-b2", 1000): 10_096_086,
    ("v2-b3", 1000): 14_358_406,
    ("v2-s", 1000): 21_458_488,
    ("v2-m", 1000): 54_139_356,
    ("v2-l", 1000): 118_515_272,
    ("v2-xl", 1000): 208_119_808,
    ("v2-s", 21843): 48_158_371,
    ("v2-xl", 21843): 234_819_691,
}


def _fixture(name: str) -> Path:
    path = FIXTURES / name
    if not (path / "ckpt" / "checkpoint").is_file():
        pytest.fail(f"ground-truth fixture missing: {path} (../shared must sit beside the project)")
    return path


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    path = _fixture(request.param)
    with np.load(path / "oracle.npz") as data:
        oracle = {k: data[k] for k in data.files}
    meta = json.loads((path / "meta.json").read_text())
    return request.param, path, oracle, meta, convert_checkpoint(path / "ckpt", variant="standard")


def _pytorch(result) -> torch.nn.Module:
    model = create_model(result.detected.arch, result.detected.num_classes)
    model.load_state_dict(result.state_dict, strict=True)
    return model


def test_converted_model_reproduces_the_official_logits(case):
    name, _, oracle, meta, result = case
    model = _pytorch(result)
    assert (meta["image_size"], meta["odd_size"]) == (224, 225)
    with torch.no_grad():
        for x, ref in (("x", "logits_ema"), ("x_odd", "logits_ema_odd")):
            logits = model(nchw(oracle[x])).numpy()
            diff, limit = assert_close(logits, oracle[ref], what=f"{name} {ref}")
            print(f"{name} {ref} max |diff| = {diff:.3g} (limit {limit:.3g})")
        assert max_abs(model(nchw(oracle["x"])), oracle["logits_ema_eps1e5"]) > 1.0  # the epsilon shows
        pixels = (oracle["pixels"] - oracle["mean_rgb"]) / oracle["stddev_rgb"]
        assert_close(model(nchw(pixels.astype(np.float32))).numpy(), oracle["logits_pixels"], what="pixels")


def test_card_and_bookkeeping(case):
    name, _, oracle, meta, result = case
    arch, family, prefix = CASES[name]
    card = result.card
    assert (card["arch"], card["family"], card["num_classes"]) == (arch, family, 10)
    assert result.detected.facts["prefix"] == prefix == meta["model_name"]
    pre = card["preprocessing"]
    assert (pre["mean"], pre["std"]) == (list(oracle["mean_rgb"]), list(oracle["stddev_rgb"]))
    assert (pre["image_size"], pre["crop_padding"], pre["interpolation"]) == (224, 32, "bicubic-tf1-legacy")
    assert pre["crop"] == "center" and "resize_bicubic" in meta["eval_preprocessing"]["resize"]
    # Lite's trainer evaluated with TF1 bilinear, its evaluator (the fixture's) bicubic: the card says both
    assert pre.get("trainer_interpolation") == ("bilinear-tf1-legacy" if family == "lite" else None)
    # every model variable used, nothing missing, only the training counter left over
    assert result.skipped == {"global_step": "training counter"}
    assert len(result.state_dict) == len(result.order)
    assert result.choice.used == "ema"
    assert card["parameters"] == sum(p.numel() for p in _pytorch(result).parameters())


def test_tf_reference_reproduces_the_official_logits(case):
    import tensorflow as tf

    from effconv.models.tf_reference import TFReferenceModel, official_variable_shapes

    name, path, oracle, _, _ = case
    arch, _, prefix = CASES[name]
    reader = tf.train.load_checkpoint(str(path / "ckpt"))
    names = official_variable_shapes(arch, 10)
    assert set(names) | {"global_step"} == {n.removesuffix(EMA) for n in reader.get_variable_to_shape_map()}
    assert all(n.startswith(prefix + "/") for n in names)
    model = TFReferenceModel(arch, {n: reader.get_tensor(n + EMA) for n in names})
    assert model.num_classes == 10
    assert_close(model(oracle["x"]), oracle["logits_ema"], what=f"{name} TF reference")
    assert_close(model(oracle["x_odd"]), oracle["logits_ema_odd"], what=f"{name} TF reference, odd size")


def test_block_table_matches_the_official_builder(case):
    name, _, _, meta, _ = case
    blocks = spec.blocks(CASES[name][0])
    assert len(blocks) == meta["num_blocks"]
    kinds = {
        "MBConv": "mbconv",
        "MBConvWithoutDepthwise": "edge_residual",
        "MBConv+CondConv": "condconv_mbconv",
        "FusedMBConv": "fused_mbconv",
    }
    activation = {"silu": "swish"}.get(meta["activation"], meta["activation"])
    for b, m in zip(blocks, meta["blocks"], strict=True):
        official = (kinds[m["type"]], m["k"], m["s"], m["e"], m["o"])
        assert (b.kind, b.kernel, b.stride, b.expand, b.out_channels) == official
        nominal = m.get("i_nominal", m.get("i"))
        assert b.mid_channels == (nominal * m["e"] if m["e"] != 1 else b.in_channels)
        assert b.activation == activation
        if "skip" in m:  # EfficientNetV2 says whether the block adds its input
            assert b.has_residual == m["skip"]
        else:  # the TPU repo says whether it may (id_skip)
            assert b.residual == m["id_skip"]
        se = m.get("se") if meta["se"] else None
        assert b.has_se == bool(se)
        if se:  # of the block's (nominal) input width
            assert b.se_channels == max(1, int(nominal * se))
        assert b.experts == (meta["params"].get("condconv_num_experts") or 0 if b.kind == "condconv_mbconv" else 0)


def test_wrong_arch_is_refused(case, tmp_path):
    name, path, *_ = case
    arch = CASES[name][0]
    with pytest.raises(UsageError, match=f"--arch b0 given, but the checkpoint holds {arch}"):
        convert_checkpoint(path / "ckpt", arch="b0")
    result = run_cli("convert", "--src", path / "ckpt", "--arch", "b0", "--out", tmp_path / "x.pth")
    assert result.exit_code != 0 and f"the checkpoint holds {arch}" in result.output
    assert not (tmp_path / "x.pth").exists()


def test_arch_names_in_any_case(case, tmp_path):
    name, path, *_ = case
    arch, _, prefix = CASES[name]
    assert spec.get_arch(prefix.upper()).name == arch and spec.official_name(arch) == prefix
    out = tmp_path / "m.pth"
    result = run_cli("convert", "--src", path / "ckpt", "--arch", prefix.lower(), "--out", out, "-q")
    assert result.exit_code == 0, result.output
    assert json.loads(out.with_suffix(".json").read_text())["arch"] == arch


@pytest.mark.parametrize(("arch", "num_classes"), list(PARAMETERS))
def test_parameter_counts(arch, num_classes):
    assert sum(p.numel() for p in create_model(arch, num_classes).parameters()) == PARAMETERS[arch, num_classes]


@pytest.mark.parametrize("name", list(CASES))
def test_parameter_counts_match_the_fixture_variables(name):
    lines = (_fixture(name) / "variables.txt").read_text().splitlines()
    shapes = [json.loads(line.split("\t")[1]) for line in lines if "moving_" not in line and "global_step" not in line]
    arch = CASES[name][0]
    assert sum(int(np.prod(s)) for s in shapes) == sum(p.numel() for p in create_model(arch, 10).parameters())
    # the released head: 1000 (Lite, CondConv, V2) or 1001 (EdgeTPU) outputs instead of the fixture's 10
    classes = 1001 if spec.get_arch(arch).family == "edgetpu" else 1000
    head = spec.head_channels(arch)
    assert sum(int(np.prod(s)) for s in shapes) + (classes - 10) * (head + 1) == PARAMETERS[arch, classes]


def test_every_size_builds_its_blocks():
    depth = {
        "lite0": 16, "lite1": 21, "lite2": 21, "lite3": 24, "lite4": 30,
        "edgetpu-s": 18, "edgetpu-m": 24, "edgetpu-l": 27,
    }  # fmt: skip
    for arch, n in depth.items():
        assert len(spec.blocks(arch)) == n, arch
    assert {spec.stem_channels(a) for a in depth if a.startswith("lite")} == {32}  # fix_head_stem
    assert {spec.head_channels(a) for a in depth if a.startswith("lite")} == {1280}
    assert (spec.stem_channels("edgetpu-l"), spec.head_channels("edgetpu-l")) == (40, 1536)  # width-scaled
    # noskip: no shortcut in stage 0 even where the shapes allow one (edgetpu-m's second 24 -> 24 block)
    m = spec.blocks("edgetpu-m")
    assert (m[1].stage, m[1].in_channels, m[1].out_channels, m[1].has_residual) == (0, 24, 24, False)
