"""Keras applications' EfficientNetB0..B7 and EfficientNetV2 layer/weight names -> effconv's native state dict, as data.

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

# --- Keras 3 (`import keras`): .keras archives, .weights.h5 files, SavedModels -----------------------------
# Keras 3 names the depthwise kernel `kernel`, and keeps the layer names above. A Keras 3 container keys a
# weight by its position in its layer (a weights store) or by an object path (a SavedModel), so these rows
# say what each position holds; the block rows above stay the one mapping to canonical names.

# --- Keras EfficientNetV2 (keras.applications.EfficientNetV2B0..B3, S, M, L) -------------------------------
# Keras 3 only (the names below are keras.applications' V2 code; tf-keras' legacy .h5 of V2 is not read). Stem,
# squeeze-excite, head and classifier are named as in EfficientNetB0..B7; the depthwise conv is `dwconv2`. A fused
# block expands with a k x k `expand_conv` and projects with a 1x1 `project_conv`; without expansion its one
# k x k conv is `project_conv`, followed by `project_bn` and `project_activation`. Fused blocks have no
# squeeze-excite in any keras.applications V2 table (nor in effconv's model).
V2_MBCONV: tuple[Rule, ...] = (
    Rule("expand_conv/kernel", "expand_conv.weight", "conv"),
    Rule("expand_bn", "expand_bn", "bn"),
    Rule("dwconv2/kernel", "dw_conv.weight", "depthwise"),
    Rule("bn", "dw_bn", "bn"),
    *_SE,
    Rule("project_conv/kernel", "project_conv.weight", "conv"),
    Rule("project_bn", "project_bn", "bn"),
)

V2_FUSED_MBCONV: tuple[Rule, ...] = (
    Rule("expand_conv/kernel", "expand_conv.weight", "conv"),
    Rule("expand_bn", "expand_bn", "bn"),
    Rule("project_conv/kernel", "project_conv.weight", "conv"),
    Rule("project_bn", "project_bn", "bn"),
)

V2_FUSED_MBCONV_NO_EXPAND: tuple[Rule, ...] = (
    Rule("project_conv/kernel", "project_conv.weight", "conv"),
    Rule("project_bn", "project_bn", "bn"),
)

V2_TABLE = SourceTable(
    name="Keras applications EfficientNetV2",
    stem=STEM,
    blocks={"mbconv": V2_MBCONV, "fused_mbconv": V2_FUSED_MBCONV, "fused_mbconv:no_expand": V2_FUSED_MBCONV_NO_EXPAND},
    head=HEAD,
    classifier=CLASSIFIER,
    block_scope="block{stage_number}{letter}_",
    bn_fields=BN_FIELDS,
)

# keras.applications' constructors and the arch each builds.
KERAS_APPLICATIONS: dict[str, str] = {f"EfficientNetB{i}": f"b{i}" for i in range(8)} | {
    f"EfficientNetV2{size.upper()}": f"v2-{size}" for size in ("b0", "b1", "b2", "b3", "s", "m", "l")
}

# Per model family: its keras.applications source table and the fields the table's rows name.
KERAS3_TABLES: dict[str, tuple[SourceTable, dict[str, str]]] = {
    "efficientnet": (TABLE, {"depthwise": "kernel"}),
    "v2": (V2_TABLE, {}),
}

# The input layers keras.applications' code builds with constants of its own, not stored in any weight: its
# EfficientNetV2 (`include_preprocessing=True`, the default) takes the V1 pipeline for B0-B3 (the model's name
# ends in b0..b3), (x / 128) - 1 for S, M and L. Per arch: (class, Keras' default name, config), in graph order.
# Containers without the model's config assume these where they show the layers (a weights file's empty groups
# of their classes, a SavedModel's constants). EfficientNetB0..B7 store their Normalization's values instead.
_V2_B_INPUT: tuple[tuple[str, str, dict], ...] = (
    ("Rescaling", "rescaling", {"scale": 1 / 255.0, "offset": 0.0}),
    ("Normalization", "normalization", {"mean": [0.485, 0.456, 0.406], "variance": [0.229**2, 0.224**2, 0.225**2]}),
)
_V2_SML_INPUT: tuple[tuple[str, str, dict], ...] = (("Rescaling", "rescaling", {"scale": 1 / 128.0, "offset": -1.0}),)
KERAS3_CODED_INPUT: dict[str, tuple[tuple[str, str, dict], ...]] = {
    **{f"v2-b{i}": _V2_B_INPUT for i in range(4)},
    **{f"v2-{size}": _V2_SML_INPUT for size in ("s", "m", "l")},
}

# Families whose keras.applications graph pads its strided convolutions with padding="same" (TF 'SAME' at any
# input size) rather than with ZeroPadding2D layers fixed when the graph is built.
KERAS3_SAME_PADDING: frozenset[str] = frozenset({"v2"})

# The classifier rows' layer: keras.applications' own `predictions`, or the Dense of a user's head.
CLASSIFIER_LAYER = "predictions"

# A layer's variables in the order its class creates them (the positions of a weights store); an optional
# one names the config flag that adds it: `flag` when config[flag] is true, `-flag` when config[flag] is null.
KERAS3_VARIABLES: dict[str, tuple[tuple[str, str | None], ...]] = {
    "Conv2D": (("kernel", None), ("bias", "use_bias")),
    "DepthwiseConv2D": (("kernel", None), ("bias", "use_bias")),
    "Dense": (("kernel", None), ("bias", "use_bias")),
    "BatchNormalization": (("gamma", "scale"), ("beta", "center"), ("moving_mean", None), ("moving_variance", None)),
    "Normalization": (("mean", "-mean"), ("variance", "-variance"), ("count", "-mean")),
}

# The class of a layer with a kernel, by the transform of its kernel row (a row of the table above); a layer
# whose rows are batch-norm fields is a BatchNormalization. Rebuilds the keys of a weights file without names.
KERAS3_KERNEL_CLASS: dict[str, str] = {"conv": "Conv2D", "depthwise": "DepthwiseConv2D", "dense": "Dense"}

# Layers of keras.applications' graph itself: the stem, the blocks and the head conv (not the top).
KERAS3_BACKBONE_LAYER = r"(stem_|top_(conv|bn|activation)$|block\d+[a-z]_)"
KERAS3_FIRST_LAYER = "stem_conv"
KERAS3_LAST_LAYER = "top_activation"
