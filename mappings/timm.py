"""timm's `tf_efficientnet_*` layout (TF 'same' padding, BN eps 1e-3), as data.

Blocks nest as `blocks.{stage}.{i}`. An expand-ratio-1 block (timm's depthwise
separable block) numbers its batch norms bn1, bn2; the others bn1..bn3. An edge
residual block (timm's EdgeResidual: `conv_exp`, `bn1`, `conv_pwl`, `bn2`) has
no depthwise conv; EfficientNetV2's fused MBConv is that block too, and without
expansion timm's ConvBnAct (`conv`, `bn1`). A CondConv block (timm's
CondConvResidual) is an MBConv with `routing_fn`, its expert kernels stored as
effconv's. One table serves every family timm has as a `tf_` model
(`FAMILY_MODELS`: the B family, Lite, EdgeTPU, CondConv, EfficientNetV2); the
others are refused before any tensor is read.
"""

from __future__ import annotations

from collections.abc import Callable

from effconv.card import ModelCard
from effconv.errors import UsageError
from effconv.mappings.tables import LayoutTable
from effconv.models import spec

_SE = (("se.reduce", "se.conv_reduce"), ("se.expand", "se.conv_expand"))
_MBCONV = (
    ("expand_conv", "conv_pw"),
    ("expand_bn", "bn1"),
    ("dw_conv", "conv_dw"),
    ("dw_bn", "bn2"),
    *_SE,
    ("project_conv", "conv_pwl"),
    ("project_bn", "bn3"),
)
_EDGE_RESIDUAL = (  # timm's EdgeResidual
    ("expand_conv", "conv_exp"),
    ("expand_bn", "bn1"),
    ("project_conv", "conv_pwl"),
    ("project_bn", "bn2"),
)

TABLE = LayoutTable(
    name="timm",
    stem=(("stem.conv", "conv_stem"), ("stem.bn", "bn1")),
    blocks={
        "mbconv": _MBCONV,
        "mbconv:no_expand": (  # timm's DepthwiseSeparableConv
            ("dw_conv", "conv_dw"),
            ("dw_bn", "bn1"),
            *_SE,
            ("project_conv", "conv_pw"),
            ("project_bn", "bn2"),
        ),
        "edge_residual": _EDGE_RESIDUAL,
        "fused_mbconv": _EDGE_RESIDUAL,
        "fused_mbconv:no_expand": (("project_conv", "conv"), ("project_bn", "bn1")),  # timm's ConvBnAct
        "condconv_mbconv": (("routing", "routing_fn"), *_MBCONV),  # timm's CondConvResidual
    },
    head=(("head.conv", "conv_head"), ("head.bn", "bn2")),
    classifier=(("classifier", "classifier"),),
    block_scope="blocks.{stage}.{pos}.",
    library="timm",
)

# Training variant -> timm's pretrained tag for the same weights.
TAGS = {
    "standard": "in1k",
    "aa": "aa_in1k",
    "advprop": "ap_in1k",
    "noisystudent": "ns_jft_in1k",
    "randaug": "ra_in1k",
    "in21k": "in21k",
    "in21k-ft1k": "in21k_ft_in1k",
}
_B0_B5 = ("b0", "b1", "b2", "b3", "b4", "b5")
_B0_B7 = (*_B0_B5, "b6", "b7")
_LITE = ("lite0", "lite1", "lite2", "lite3", "lite4")
_EDGETPU = ("edgetpu-s", "edgetpu-m", "edgetpu-l")
_CONDCONV = ("condconv-b0-4e", "condconv-b0-8e", "condconv-b0-8e-depth")
_V2_21K = ("v2-b3", "v2-s", "v2-m", "v2-l", "v2-xl")
# The archs timm (1.0) has each tag for (`timm.list_pretrained("tf_efficientnet_*")` and `"tf_efficientnetv2_*"`;
# the timm-side test checks this table): `create_model(f"{model_name(arch)}.{tag}")` fails for any other pair.
TAGGED_ARCHS = {
    "in1k": (*_B0_B5, *_LITE, *_EDGETPU, *_CONDCONV, "v2-b0", "v2-b1", "v2-b2", "v2-b3", "v2-s", "v2-m", "v2-l"),
    "aa_in1k": _B0_B7,
    "ap_in1k": (*_B0_B7, "b8"),
    "ns_jft_in1k": (*_B0_B7, "l2"),
    "ns_jft_in1k_475": ("l2",),
    "ra_in1k": ("b5", "b7", "b8"),
    "in21k": _V2_21K,
    "in21k_ft_in1k": _V2_21K,
}
# In the card's `create` line, the path of the weights file beside the card (X.pth or X.safetensors).
WEIGHTS_VARIABLE = "weights"


_TF_EFFICIENTNET = "tf_efficientnet_{}"
# timm names the deeper 8-expert CondConv (depth 1.1, the official condconv-b0-8e-depth) b1
_CONDCONV_MODELS = {"condconv-b0-4e": "cc_b0_4e", "condconv-b0-8e": "cc_b0_8e", "condconv-b0-8e-depth": "cc_b1_8e"}
# Family -> timm's model for each of its sizes, by arch: the `tf_` models, built as the official code (TF 'same'
# padding, BN eps 1e-3). A family missing here has no such model in timm.
FAMILY_MODELS: dict[str, Callable[[str], str]] = {
    "efficientnet": _TF_EFFICIENTNET.format,
    "lite": _TF_EFFICIENTNET.format,
    "edgetpu": lambda arch: _TF_EFFICIENTNET.format("e" + arch.removeprefix("edgetpu-")),  # es, em, el
    "condconv": lambda arch: _TF_EFFICIENTNET.format(_CONDCONV_MODELS[arch]),
    "v2": lambda arch: "tf_efficientnetv2_" + arch.removeprefix("v2-"),
}


def model_name(arch: str) -> str:
    """timm's `create_model` name of `arch` (`tf_efficientnet_b5`, `tf_efficientnet_lite0`, `tf_efficientnet_es`,
    `tf_efficientnet_cc_b0_4e`, `tf_efficientnetv2_s`)."""
    family = spec.family_of(arch).name
    if family not in FAMILY_MODELS:
        have = ", ".join(FAMILY_MODELS)
        raise UsageError(
            f"--layout timm cannot hold {spec.official_name(arch)}: timm has no tf_ model of the {family!r} family "
            f"(it has {have}); use --layout native"
        )
    return FAMILY_MODELS[family](spec.get_arch(arch).name)


def check_expressible(arch: str, image_size: int) -> None:
    """Refuse, before any tensor is read, an arch of a family timm has no `tf_` model of (any size is exact)."""
    model_name(arch)


def pretrained_name(arch: str, tag: str) -> str:
    """`<model_name(arch)>.<tag>` where timm has that tag for the arch; the bare name (timm's default tag)
    otherwise: the card's data config comes with the overlay either way."""
    return f"{model_name(arch)}.{tag}" if arch in TAGGED_ARCHS.get(tag, ()) else model_name(arch)


def _python(value) -> str:
    """A value of the `create` line as Python source (tuples where timm's own configs have them)."""
    return repr(tuple(value)) if isinstance(value, list) else repr(value)


def card_section(card: ModelCard | dict) -> dict:
    """What timm needs beside the weights: the model name, a timm-style `pretrained_cfg`, and the `create` line.

    `create` builds the model with the variant's pretrained tag and loads the weights through
    `pretrained_cfg_overlay=dict(file=weights, ...)` (timm's way to take a local .pth or .safetensors), the
    overlay carrying the card's data config and classes: `timm.data.resolve_model_data_config(model)` then
    gives the card's mean/std, crop and input size (a `pretrained=False` model would get timm's defaults, and
    another class count than the overlay's would make timm drop the classifier). `weights` stands for the
    path of the file beside this card. `card`: a model card, or its JSON (the dict a conversion is building).
    """
    card = ModelCard.from_json(card, where="the model card for timm")
    arch, size, pre = card.arch, card.input_size(), card.needs_preprocessing("timm's pretrained_cfg needs it")
    tag = TAGS.get(card.variant, "in1k") + ("_475" if arch == "l2" and size == 475 else "")
    name = model_name(arch)
    cropped = pre.crop != "none"  # EfficientNetV2 S-XL at 320 px and more: the whole image resized to size x size
    data_config = {
        "input_size": [3, size, size],
        "interpolation": "bilinear" if (pre.interpolation or "").startswith("bilinear") else "bicubic",
        "crop_pct": round(float(pre.crop_fraction), 3) if cropped else 1.0,
        "crop_mode": "center" if cropped else "squash",
        "mean": [round(m / 255.0, 8) for m in pre.mean],
        "std": [round(s / 255.0, 8) for s in pre.std],
    }
    overlay = {"file": WEIGHTS_VARIABLE, "num_classes": card.num_classes, **data_config}
    arguments = ", ".join(f"{k}={v if k == 'file' else _python(v)}" for k, v in overlay.items())
    create = (
        f"timm.create_model({pretrained_name(arch, tag)!r}, pretrained=True, "
        f"pretrained_cfg_overlay=dict({arguments}), num_classes={card.num_classes})"
    )
    return {
        "model_name": name,
        "pretrained_name": pretrained_name(arch, tag),
        "pretrained_cfg": {
            "architecture": name,
            "tag": tag,
            **data_config,
            "num_classes": card.num_classes,
            "first_conv": "conv_stem",
            "classifier": "classifier",
        },
        "create": create,
        "weights": f"in `create`, {WEIGHTS_VARIABLE} is the path of the weights file beside this card",
    }
