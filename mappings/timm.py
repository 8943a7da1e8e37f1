"""timm's `tf_efficientnet_<arch>` layout (TF 'same' padding, BN eps 1e-3), as data.

Blocks nest as `blocks.{stage}.{i}`. An expand-ratio-1 block (timm's depthwise
separable block) numbers its batch norms bn1, bn2; the others bn1..bn3.
"""

from __future__ import annotations

from effconv.card import ModelCard
from effconv.mappings.tables import LayoutTable

_SE = (("se.reduce", "se.conv_reduce"), ("se.expand", "se.conv_expand"))

TABLE = LayoutTable(
    name="timm",
    stem=(("stem.conv", "conv_stem"), ("stem.bn", "bn1")),
    blocks={
        "mbconv": (
            ("expand_conv", "conv_pw"),
            ("expand_bn", "bn1"),
            ("dw_conv", "conv_dw"),
            ("dw_bn", "bn2"),
            *_SE,
            ("project_conv", "conv_pwl"),
            ("project_bn", "bn3"),
        ),
        "mbconv:no_expand": (  # timm's DepthwiseSeparableConv
            ("dw_conv", "conv_dw"),
            ("dw_bn", "bn1"),
            *_SE,
            ("project_conv", "conv_pw"),
            ("project_bn", "bn2"),
        ),
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
}
_B0_B5 = ("b0", "b1", "b2", "b3", "b4", "b5")
_B0_B7 = (*_B0_B5, "b6", "b7")
# The archs timm (1.0) has each tag for (`timm.list_pretrained("tf_efficientnet_*")`; the timm-side test
# checks this table): `create_model("tf_efficientnet_<arch>.<tag>")` fails for any other pair.
TAGGED_ARCHS = {
    "in1k": _B0_B5,
    "aa_in1k": _B0_B7,
    "ap_in1k": (*_B0_B7, "b8"),
    "ns_jft_in1k": (*_B0_B7, "l2"),
    "ns_jft_in1k_475": ("l2",),
    "ra_in1k": ("b5", "b7", "b8"),
}
# In the card's `create` line, the path of the weights file beside the card (X.pth or X.safetensors).
WEIGHTS_VARIABLE = "weights"


def model_name(arch: str) -> str:
    return f"tf_efficientnet_{arch}"


def pretrained_name(arch: str, tag: str) -> str:
    """`tf_efficientnet_<arch>.<tag>` where timm has that tag for the arch; the bare name (timm's default tag)
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
    data_config = {
        "input_size": [3, size, size],
        "interpolation": "bicubic",
        "crop_pct": round(float(pre.crop_fraction), 3),
        "crop_mode": "center",
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
