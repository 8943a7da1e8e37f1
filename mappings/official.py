"""Official TPU-repo variable names -> effconv's native state dict, as data.

Each row is (source suffix, target suffix, transform). `{bn}` stands for the
batch-norm scope name (`tpu_batch_normalization` or `batch_normalization`); a
row with transform "bn" expands to the four batch-norm variables. The engine in
`effconv.mappings.engine` expands these rows over the architecture table.
"""

from __future__ import annotations

from effconv.mappings.tables import Rule, SourceTable

# TF batch-norm variable -> PyTorch batch-norm tensor.
BN_FIELDS: tuple[tuple[str, str], ...] = (
    ("gamma", "weight"),
    ("beta", "bias"),
    ("moving_mean", "running_mean"),
    ("moving_variance", "running_var"),
)

STEM: tuple[Rule, ...] = (
    Rule("stem/conv2d/kernel", "stem.conv.weight", "conv"),
    Rule("stem/{bn}", "stem.bn", "bn"),
)

_SE: tuple[Rule, ...] = (
    Rule("se/conv2d/kernel", "se.reduce.weight", "conv", "se"),
    Rule("se/conv2d/bias", "se.reduce.bias", "copy", "se"),
    Rule("se/conv2d_1/kernel", "se.expand.weight", "conv", "se"),
    Rule("se/conv2d_1/bias", "se.expand.bias", "copy", "se"),
)

# Scope suffixes (_1, _2) follow call order inside each block, so they shift
# by one when the block has no expand conv.
MBCONV: tuple[Rule, ...] = (
    Rule("conv2d/kernel", "expand_conv.weight", "conv"),
    Rule("{bn}", "expand_bn", "bn"),
    Rule("depthwise_conv2d/depthwise_kernel", "dw_conv.weight", "depthwise"),
    Rule("{bn}_1", "dw_bn", "bn"),
    *_SE,
    Rule("conv2d_1/kernel", "project_conv.weight", "conv"),
    Rule("{bn}_2", "project_bn", "bn"),
)

MBCONV_NO_EXPAND: tuple[Rule, ...] = (
    Rule("depthwise_conv2d/depthwise_kernel", "dw_conv.weight", "depthwise"),
    Rule("{bn}", "dw_bn", "bn"),
    *_SE,
    Rule("conv2d/kernel", "project_conv.weight", "conv"),
    Rule("{bn}_1", "project_bn", "bn"),
)

# Edge residual (MBConvBlockWithoutDepthwise): the k x k expand conv, then the 1x1 project.
EDGE_RESIDUAL: tuple[Rule, ...] = (
    Rule("conv2d/kernel", "expand_conv.weight", "conv"),
    Rule("{bn}", "expand_bn", "bn"),
    Rule("conv2d_1/kernel", "project_conv.weight", "conv"),
    Rule("{bn}_1", "project_bn", "bn"),
)

# EfficientNetV2's fused MBConv: with expansion the edge residual's rows; without, one k x k conv.
FUSED_MBCONV_NO_EXPAND: tuple[Rule, ...] = (
    Rule("conv2d/kernel", "project_conv.weight", "conv"),
    Rule("{bn}", "project_bn", "bn"),
)

# CondConv MBConv: MBConv's batch norms and squeeze-excite, a routing dense layer, and three CondConv
# kernels. The kernels are Keras-layer variables: under the Keras model's scope (`model/` in the
# official code run today) and named by graph-wide layer numbers, so the rows name them by their order
# in the block (`<cond_conv2d#0>`, the block's lower-numbered cond_conv2d: the expand conv), and
# `~/` roots them at the network's scope rather than the block's. NUMBERED_LAYERS says how the official
# code numbers them, for checkpoints written here.
CONDCONV_MBCONV: tuple[Rule, ...] = (
    Rule("dense/kernel", "routing.weight", "dense"),
    Rule("dense/bias", "routing.bias", "copy"),
    Rule("~/model/blocks_{index}/<cond_conv2d#0>/condconv_kernel", "expand_conv.weight", "expert_conv:1:{mid}"),
    Rule("{bn}", "expand_bn", "bn"),
    Rule(
        "~/model/blocks_{index}/<depthwise_cond_conv2d#0>/depthwise_condconv_kernel",
        "dw_conv.weight",
        "expert_depthwise:{kernel}",
    ),
    Rule("{bn}_1", "dw_bn", "bn"),
    *_SE,
    Rule("~/model/blocks_{index}/<cond_conv2d#1>/condconv_kernel", "project_conv.weight", "expert_conv:1:{out}"),
    Rule("{bn}_2", "project_bn", "bn"),
)
# Layer name -> (layers of that name each CondConv block constructs, the first one its rows use): the
# official block builds one unused cond_conv2d (for its fused-conv path) before its expand conv.
NUMBERED_LAYERS: dict[str, tuple[int, int]] = {"cond_conv2d": (3, 1), "depthwise_cond_conv2d": (1, 0)}

HEAD: tuple[Rule, ...] = (
    Rule("head/conv2d/kernel", "head.conv.weight", "conv"),
    Rule("head/{bn}", "head.bn", "bn"),
)

CLASSIFIER: tuple[Rule, ...] = (
    Rule("head/dense/kernel", "classifier.weight", "dense"),
    Rule("head/dense/bias", "classifier.bias", "copy"),
)

BLOCK_SCOPE = "blocks_{index}"
BLOCK_TARGET = "blocks.{index}"
BN_SCOPES: tuple[str, ...] = ("tpu_batch_normalization", "batch_normalization")
EMA_SUFFIX = "/ExponentialMovingAverage"
# Training-only variables that may sit beside the model's: (suffix or name, reason).
KNOWN_EXTRAS: tuple[tuple[str, str], ...] = (
    ("/RMSProp", "optimizer slot"),
    ("/RMSProp_1", "optimizer slot"),
    ("/Momentum", "optimizer slot"),
    ("/Adam", "optimizer slot"),
    ("/Adam_1", "optimizer slot"),
)
KNOWN_GLOBALS: tuple[str, ...] = ("global_step",)

TABLE = SourceTable(
    name="official TF checkpoint",
    stem=STEM,
    blocks={
        "mbconv": MBCONV,
        "mbconv:no_expand": MBCONV_NO_EXPAND,
        "edge_residual": EDGE_RESIDUAL,
        "fused_mbconv": EDGE_RESIDUAL,
        "fused_mbconv:no_expand": FUSED_MBCONV_NO_EXPAND,
        "condconv_mbconv": CONDCONV_MBCONV,
    },
    head=HEAD,
    classifier=CLASSIFIER,
    block_scope=BLOCK_SCOPE + "/",
    bn_fields=BN_FIELDS,
    known_names=tuple((name, "training counter") for name in KNOWN_GLOBALS),
    known_suffixes=KNOWN_EXTRAS,
    numbered_layers=NUMBERED_LAYERS,
    # EfficientNetV2's classifier: `head/dense` in the released checkpoints, `head_1/dense` when the
    # current automl code is built in TF1 graph mode (what its trainer writes today)
    aliases=(("head/dense/", "head_1/dense/"),),
)
