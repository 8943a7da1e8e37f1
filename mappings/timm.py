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


def model_name(arch: str) -> str:
    return f"tf_efficientnet_{arch}"


def card_section(card: ModelCard | dict) -> dict:
    """What timm needs beside the weights: the model name and a timm-style `pretrained_cfg`.

    `card`: a model card, or its JSON (the dict a conversion is building).
    """
    card = ModelCard.from_json(card, where="the model card for timm")
    arch, size, pre = card.arch, card.input_size(), card.needs_preprocessing("timm's pretrained_cfg needs it")
    tag = TAGS.get(card.variant, "in1k") + ("_475" if arch == "l2" and size == 475 else "")
    name = model_name(arch)
    return {
        "model_name": name,
        "pretrained_cfg": {
            "architecture": name,
            "tag": tag,
            "input_size": [3, size, size],
            "interpolation": "bicubic",
            "crop_pct": round(float(pre.crop_fraction), 3),
            "crop_mode": "center",
            "mean": [round(m / 255.0, 8) for m in pre.mean],
            "std": [round(s / 255.0, 8) for s in pre.std],
            "num_classes": card.num_classes,
            "first_conv": "conv_stem",
            "classifier": "classifier",
        },
        "create": f"timm.create_model({name!r}, pretrained=False, num_classes={card.num_classes})",
    }
