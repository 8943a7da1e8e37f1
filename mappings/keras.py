"""Keras applications' EfficientNetB0..B7 layer/weight names -> effconv's native state dict, as data.

Source names are `<layer>/<weight>` as `KerasH5Reader` lists them. Blocks are
named `block{stage number}{letter}_`. The depthwise kernel is called
`depthwise_kernel` by Keras 2 (and the Keras applications weight files) and
`kernel` by Keras 3: `{depthwise}` is filled with the name the file uses.
Keras, like the official code, keeps kernels as HWIO and dense as [in, out].
"""

from __future__ import annotations

from effconv.mappings.tables import Rule, SourceTable

BN_FIELDS: tuple[tuple[str, str], ...] = (
    ("gamma", "weight"),
    ("beta", "bias"),
    ("moving_mean", "running_mean"),
    ("moving_variance", "running_var"),
)
DEPTHWISE_NAMES: tuple[str, ...] = ("depthwise_kernel", "kernel")  # Keras 2, Keras 3

STEM: tuple[Rule, ...] = (
    Rule("stem_conv/kernel", "stem.conv.weight", "conv"),
    Rule("stem_bn", "stem.bn", "bn"),
)

_SE: tuple[Rule, ...] = (
    Rule("se_reduce/kernel", "se.reduce.weight", "conv", "se"),
    Rule("se_reduce/bias", "se.reduce.bias", "copy", "se"),
    Rule("se_expand/kernel", "se.expand.weight", "conv", "se"),
    Rule("se_expand/bias", "se.expand.bias", "copy", "se"),
)

_DEPTHWISE: tuple[Rule, ...] = (
    Rule("dwconv/{depthwise}", "dw_conv.weight", "depthwise"),
    Rule("bn", "dw_bn", "bn"),
)

MBCONV: tuple[Rule, ...] = (
    Rule("expand_conv/kernel", "expand_conv.weight", "conv"),
    Rule("expand_bn", "expand_bn", "bn"),
    *_DEPTHWISE,
    *_SE,
    Rule("project_conv/kernel", "project_conv.weight", "conv"),
    Rule("project_bn", "project_bn", "bn"),
)

MBCONV_NO_EXPAND: tuple[Rule, ...] = (
    *_DEPTHWISE,
    *_SE,
    Rule("project_conv/kernel", "project_conv.weight", "conv"),
    Rule("project_bn", "project_bn", "bn"),
)

HEAD: tuple[Rule, ...] = (
    Rule("top_conv/kernel", "head.conv.weight", "conv"),
    Rule("top_bn", "head.bn", "bn"),
)

CLASSIFIER: tuple[Rule, ...] = (
    Rule("predictions/kernel", "classifier.weight", "dense"),
    Rule("predictions/bias", "classifier.bias", "copy"),
)

# The in-graph Normalization layer (`normalization`, or `normalization_1`... when Keras uniquified
# the name): not model tensors, folded into the card's mean/std.
NORMALIZATION_LAYER = r"normalization(_\d+)?"
NORMALIZATION_REASON = "input normalisation (folded into the card's mean/std)"

TABLE = SourceTable(
    name="Keras applications",
    stem=STEM,
    blocks={"mbconv": MBCONV, "mbconv:no_expand": MBCONV_NO_EXPAND},
    head=HEAD,
    classifier=CLASSIFIER,
    block_scope="block{stage_number}{letter}_",
    bn_fields=BN_FIELDS,
    known_suffixes=tuple((f"/{v}", NORMALIZATION_REASON) for v in ("mean", "variance", "count")),
)
