from __future__ import annotations

import pytest

from effconv.errors import CheckpointError, UsageError
from effconv.formats.tf_checkpoint import detect_layout
from effconv.mappings import engine
from effconv.mappings.official import EMA_SUFFIX
from effconv.models import spec


def shapes_of(arch, num_classes=1000, prefix=None, bn="tpu_batch_normalization", ema=False):
    prefix = f"efficientnet-{arch}" if prefix is None else prefix
    shapes = engine.source_shapes(engine.official_plan(arch, num_classes, prefix, bn), arch, num_classes)
    if ema:
        shapes = {k + EMA_SUFFIX: v for k, v in shapes.items()}
    return {**shapes, "global_step": ()}


@pytest.mark.parametrize("arch", spec.ARCH_NAMES)
def test_detects_every_arch_from_names_and_shapes(arch):
    layout = detect_layout(shapes_of(arch))
    assert (layout.arch, layout.num_classes, layout.bn) == (arch, 1000, "tpu_batch_normalization")
    assert layout.num_blocks == len(spec.blocks(arch))


def test_matches_fixture_shapes(fixture_dir):
    import json

    lines = (fixture_dir / "variables.txt").read_text().splitlines()
    fixture = {n: tuple(json.loads(s)) for n, s, _ in (line.split("\t") for line in lines)}
    official = engine.source_shapes(engine.official_plan("b0", 1000, "efficientnet-b0"), "b0", 1000)
    assert {k: v for k, v in fixture.items() if not k.endswith(EMA_SUFFIX) and k != "global_step"} == official


def test_custom_prefix_batch_norm_and_classes():
    layout = detect_layout(shapes_of("b2", 10, prefix="my_model", bn="batch_normalization", ema=True))
    assert (layout.arch, layout.prefix, layout.bn, layout.num_classes) == ("b2", "my_model", "batch_normalization", 10)
    assert detect_layout(shapes_of("b1", 1001)).num_classes == 1001
    assert detect_layout(shapes_of("b4", 0)).num_classes == 0


def test_contradicting_arch_names_both():
    with pytest.raises(UsageError, match=r"--arch b5 given, but the checkpoint holds b0"):
        detect_layout(shapes_of("b0"), arch="b5")
    assert detect_layout(shapes_of("b0"), arch="b0").arch == "b0"


def test_prefix_that_lies_about_the_arch():
    with pytest.raises(CheckpointError, match="prefix says 'efficientnet-b3'.*not b3"):
        detect_layout(shapes_of("b0", prefix="efficientnet-b3"))


def test_not_an_efficientnet():
    with pytest.raises(CheckpointError, match="not an EfficientNet checkpoint"):
        detect_layout({"resnet/conv1/kernel": (7, 7, 3, 64), "global_step": ()})
    with pytest.raises(CheckpointError, match="several networks"):
        detect_layout({**shapes_of("b0"), **shapes_of("b1")})


def test_sizes_that_agree_in_shape_are_told_apart_by_their_names():
    # b0, lite0 and the CondConv b0s have the same blocks, stem and head: without an official prefix the
    # variables decide (lite0 has no squeeze-excite, CondConv has expert kernels, 4 or 8 of them).
    for arch in ("b0", "lite0", "condconv-b0-4e", "condconv-b0-8e", "b1", "condconv-b0-8e-depth"):
        assert detect_layout(shapes_of(arch, prefix="model")).arch == arch
    assert detect_layout(shapes_of("edgetpu-m", prefix="")).arch == "edgetpu-m"
    assert spec.archs_of_shape(16, 32, 1280) == ["b0", "lite0", "condconv-b0-4e", "condconv-b0-8e"]
    assert spec.archs_of_shape(23, 32, 1280) == ["b1", "condconv-b0-8e-depth"]
