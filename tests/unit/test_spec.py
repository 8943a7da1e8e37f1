from __future__ import annotations

import pytest

from effconv.errors import UsageError
from effconv.models import spec

# FACTS.md section 1.
BLOCK_COUNTS = {"b0": 16, "b1": 23, "b2": 23, "b3": 26, "b4": 32, "b5": 39, "b6": 45, "b7": 55, "b8": 61, "l2": 88}
# Lite (first and last stage not depth-scaled) and EdgeTPU, from the official builders' tables.
BLOCK_COUNTS |= {"lite0": 16, "lite1": 21, "lite2": 21, "lite3": 24, "lite4": 30}
BLOCK_COUNTS |= {"edgetpu-s": 18, "edgetpu-m": 24, "edgetpu-l": 27}
# CondConv (B0's table, depth 1.1 for -depth) and EfficientNetV2 (effnetv2_configs.py: b0-b3 scale the base
# table, S/M/L/XL have their own)
BLOCK_COUNTS |= {"condconv-b0-4e": 16, "condconv-b0-8e": 16, "condconv-b0-8e-depth": 23}
BLOCK_COUNTS |= {"v2-b0": 21, "v2-b1": 27, "v2-b2": 28, "v2-b3": 32, "v2-s": 40, "v2-m": 57, "v2-l": 79, "v2-xl": 100}
STEM_HEAD = {
    "b0": (32, 1280),
    "b2": (32, 1408),
    "b3": (40, 1536),
    "b4": (48, 1792),
    "b5": (48, 2048),
    "b6": (56, 2304),
    "b7": (64, 2560),
    "b8": (72, 2816),
    "l2": (136, 5504),
    "v2-b2": (32, 1408),
    "v2-b3": (40, 1536),
    "v2-s": (24, 1280),  # the stem takes the first stage's input width
    "v2-m": (24, 1280),
    "v2-xl": (32, 1280),
}


@pytest.mark.parametrize("arch", spec.ARCH_NAMES)
def test_block_counts(arch):
    assert len(spec.blocks(arch)) == BLOCK_COUNTS[arch]
    assert [b.index for b in spec.blocks(arch)] == list(range(BLOCK_COUNTS[arch]))


@pytest.mark.parametrize("arch", sorted(STEM_HEAD))
def test_stem_and_head_channels(arch):
    assert (spec.stem_channels(arch), spec.head_channels(arch)) == STEM_HEAD[arch]


def test_rounding_rules():
    b = spec.FAMILIES["efficientnet"]
    assert b.round_channels(32, 4.3) == 136  # 137.6 -> 136, within 10 %
    assert b.round_channels(16, 1.1) == 16  # 17.6 -> 16
    assert b.round_channels(3, 1.0) == 8  # floor at the divisor
    assert b.round_repeats(1, 2.2) == 3
    assert b.round_repeats(4, 3.1) == 13


def test_block_rules():
    b0 = spec.blocks("b0")
    assert not b0[0].has_expand and b0[0].se_channels == 8 and b0[0].mid_channels == 32
    assert b0[1].stride == 2 and not b0[1].has_residual and b0[1].se_channels == 4
    assert b0[2].stride == 1 and b0[2].has_residual
    # SE width follows the block INPUT channels, not the expanded ones.
    assert all(b.se_channels == max(1, int(b.in_channels * 0.25)) for b in spec.blocks("l2"))
    # Every block of the first stage has expand ratio 1 (b5 has three of them).
    assert sum(not b.has_expand for b in spec.blocks("b5")) == 3
    assert sum(not b.has_expand for b in spec.blocks("l2")) == 6


def test_stage_ends_cover_all_stages():
    ends = spec.stage_ends("b0")
    assert ends == (0, 2, 4, 7, 10, 14, 15)


def test_unknown_arch_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown architecture"):
        spec.get_arch("b9")
    assert spec.get_arch("efficientnet-b3").name == "b3"


def test_the_b_family_keeps_its_figures():
    from effconv.models.families import FAMILIES

    assert list(FAMILIES) == ["efficientnet", "lite", "edgetpu", "condconv", "v2"]
    family = spec.family_of("b5")
    b_archs = [s.name for s in family.sizes]
    assert b_archs == list(spec.ARCH_NAMES)[: len(b_archs)]
    assert (family.activation, family.bn_eps, family.bn_momentum, family.padding) == ("swish", 1e-3, 0.01, "tf-same")
    assert not family.fix_stem_head and family.se_base == "block_in" and family.round_up_below == 0.9
    for arch in b_archs:
        assert {b.kind for b in spec.blocks(arch)} == {"mbconv"}
        assert all(b.has_se and b.activation == "swish" for b in spec.blocks(arch))
        assert {b.variant for b in spec.blocks(arch)} == {"mbconv", "mbconv:no_expand"}


def test_official_names_resolve_to_the_short_ones():
    assert spec.get_arch("efficientnet-l2").name == "l2" and spec.get_arch("EfficientNet_B5").name == "b5"
    assert spec.official_name("b5") == "efficientnet-b5"
    assert spec.OFFICIAL_NAMES["efficientnet-b0"] == "b0" and len(spec.OFFICIAL_NAMES) == len(spec.ARCH_NAMES)
    assert spec.archs_of_shape(16, 32, 1280) == ["b0", "lite0", "condconv-b0-4e", "condconv-b0-8e"]
    assert spec.get_arch("efficientnetv2-s").name == "v2-s" and spec.official_name("v2-xl") == "efficientnetv2-xl"
    assert spec.get_arch("EfficientNet-CondConv-B0-8E-Depth").name == "condconv-b0-8e-depth"
    # EdgeTPU's official names end in a capital letter; the short names are lower case
    assert (
        spec.official_name("edgetpu-m") == "efficientnet-edgetpu-M" and spec.get_arch("EDGETPU-M").name == "edgetpu-m"
    )
    assert spec.get_arch("efficientnet-edgetpu-m").name == "edgetpu-m"
