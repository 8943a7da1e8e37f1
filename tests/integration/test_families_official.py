"""EfficientNet-Lite and -EdgeTPU against the official code's own outputs (the official-lite0 / -edgetpu-s fixtures)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from effconv.convert import convert_checkpoint
from effconv.errors import MappingError, UsageError
from effconv.models import create_model, spec
from tests.conftest import PROJECT_ROOT
from tests.support.helpers import assert_close, max_abs, nchw, run_cli

FIXTURES = PROJECT_ROOT.parent / "shared" / "fixtures"
EMA = "/ExponentialMovingAverage"
# fixture -> (arch, family, official prefix)
CASES = {
    "official-lite0": ("lite0", "lite", "efficientnet-lite0"),
    "official-edgetpu-s": ("edgetpu-s", "edgetpu", "efficientnet-edgetpu-S"),
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
    assert (pre["mean"], pre["std"]) == ([127.0] * 3, [128.0] * 3)
    assert (pre["image_size"], pre["crop_padding"], pre["interpolation"]) == (224, 32, "bicubic-tf1-legacy")
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
    kinds = {"MBConv": "mbconv", "MBConvWithoutDepthwise": "edge_residual"}
    for b, m in zip(blocks, meta["blocks"], strict=True):
        official = (kinds[m["type"]], m["k"], m["s"], m["e"], m["o"])
        assert (b.kind, b.kernel, b.stride, b.expand, b.out_channels) == official
        assert b.mid_channels == (m["i_nominal"] * m["e"] if m["e"] != 1 else b.in_channels)
        assert not b.has_se and b.activation == meta["activation"] and b.residual == m["id_skip"]


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


def test_edge_residual_has_no_timm_rows_yet():
    with pytest.raises(MappingError, match="no rows for edge_residual blocks"):
        convert_checkpoint(_fixture("official-edgetpu-s") / "ckpt", layout="timm", variant="standard")


@pytest.mark.parametrize(("arch", "num_classes"), list(PARAMETERS))
def test_parameter_counts(arch, num_classes):
    assert sum(p.numel() for p in create_model(arch, num_classes).parameters()) == PARAMETERS[arch, num_classes]


@pytest.mark.parametrize("name", list(CASES))
def test_parameter_counts_match_the_fixture_variables(name):
    lines = (_fixture(name) / "variables.txt").read_text().splitlines()
    shapes = [json.loads(line.split("\t")[1]) for line in lines if "moving_" not in line and "global_step" not in line]
    arch = CASES[name][0]
    assert sum(int(np.prod(s)) for s in shapes) == sum(p.numel() for p in create_model(arch, 10).parameters())
    # the released head: 1000 (Lite) or 1001 (EdgeTPU) outputs instead of the fixture's 10
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
