"""mmpretrain's `ImageClassifier` with the `EfficientNet` backbone and `LinearClsHead`, as data.

The backbone's `layers.0` is the stem; every stride-1 stage after the first
joins the stage before it (stages 4+5 and 6+7 of the base network), and the
head conv is the layer after the last block layer. Each conv is a ConvModule
(`.conv`, `.bn`); the squeeze-excite convs are ConvModules without a norm.
"""

from __future__ import annotations

from effconv.card import ModelCard
from effconv.mappings.tables import LayoutTable
from effconv.models import spec
from effconv.variants import ADVPROP_MEAN, ADVPROP_STD, IMAGENET_MEAN, IMAGENET_STD

_BLOCK = (
    ("dw_conv", "depthwise_conv.conv"),
    ("dw_bn", "depthwise_conv.bn"),
    ("se.reduce", "se.conv1.conv"),
    ("se.expand", "se.conv2.conv"),
    ("project_conv", "linear_conv.conv"),
    ("project_bn", "linear_conv.bn"),
)

TABLE = LayoutTable(
    name="mmpretrain",
    stem=(("stem.conv", "backbone.layers.0.conv"), ("stem.bn", "backbone.layers.0.bn")),
    blocks={
        "mbconv": (("expand_conv", "expand_conv.conv"), ("expand_bn", "expand_conv.bn"), *_BLOCK),
        "mbconv:no_expand": _BLOCK,
    },
    head=(("head.conv", "backbone.layers.{head_layer}.conv"), ("head.bn", "backbone.layers.{head_layer}.bn")),
    classifier=(("classifier", "head.fc"),),
    block_scope="backbone.layers.{layer}.{layer_pos}.",
    library="mmpretrain",
    checkpoint_key="state_dict",
)


def _is(values, reference) -> bool:
    return all(abs(float(a) - b) <= 1e-6 * max(1.0, abs(b)) for a, b in zip(values, reference, strict=True))


def config_name(arch: str, image_size: int, zero_one_norm: bool) -> str:
    """The mmpretrain config that builds this model with the matching data preprocessor."""
    if arch == "l2":
        return "efficientnet-l2_8xb32_in1k-475px" if image_size == 475 else "efficientnet-l2_8xb8_in1k-800px"
    return f"efficientnet-{arch}_8xb32{'-01norm' if zero_one_norm else ''}_in1k"


_B0_B5 = ("b0", "b1", "b2", "b3", "b4", "b5")
_B0_B7 = (*_B0_B5, "b6", "b7")
# mmpretrain (1.2)'s EfficientNet models by training variant: (name, the archs it has); the
# mmpretrain-side test checks this table against `mmpretrain.list_models("efficientnet*")`.
VARIANT_MODELS = {
    "standard": ("efficientnet-{arch}_3rdparty_8xb32_in1k", _B0_B5),
    "aa": ("efficientnet-{arch}_3rdparty_8xb32-aa_in1k", _B0_B7),
    "advprop": ("efficientnet-{arch}_3rdparty_8xb32-aa-advprop_in1k", (*_B0_B7, "b8")),
    "noisystudent": ("efficientnet-{arch}_3rdparty-ra-noisystudent_in1k", _B0_B7),
}
# In the card's `create` lines, the path of the weights file beside the card.
WEIGHTS_VARIABLE = "weights"


def model_name(arch: str, image_size: int, zero_one_norm: bool, variant: str | None = None) -> str | None:
    """A `mmpretrain.get_model` name for this model: the variant's own where mmpretrain has it, else one built
    from `config_name`'s config (the data preprocessor that fits); its weights are replaced by ours."""
    if arch == "l2":
        return f"efficientnet-l2_3rdparty-ra-noisystudent_in1k-{475 if image_size == 475 else 800}px"
    name, archs = VARIANT_MODELS.get(variant or "", ("", ()))
    if arch in archs and (variant == "advprop") == zero_one_norm:  # its data preprocessor fits the card's
        return name.format(arch=arch)
    if zero_one_norm:
        return f"efficientnet-{arch}_3rdparty_8xb32-aa-advprop_in1k"
    return None if arch == "b8" else f"efficientnet-{arch}_3rdparty_8xb32-aa_in1k"  # no ImageNet-norm b8 model


def create_lines(name: str | None, num_classes: int) -> dict[str, str]:
    """How to build the model with these weights: `get_model`, its head sized for the card's classes.

    mmpretrain's `get_model(name, pretrained=file)` alone keeps the config's 1000-class head: on another
    class count it warns "size mismatch" and leaves that head random. mmengine reads torch files only, so a
    .safetensors is loaded into the built model.
    """
    if name is None:
        return {}
    head = f"head=dict(num_classes={num_classes})" if num_classes else "head=None"
    return {
        "create": f"get_model({name!r}, pretrained={WEIGHTS_VARIABLE}, {head})",
        "create_safetensors": (
            f"model = get_model({name!r}, {head}); "
            f"model.load_state_dict(safetensors.torch.load_file({WEIGHTS_VARIABLE}), strict=True)"
        ),
        "weights": f"in the create lines, {WEIGHTS_VARIABLE} is the path of the weights file beside this card "
        "(create: the .pth; create_safetensors: the .safetensors)",
    }


def card_section(card: ModelCard | dict) -> dict:
    """The matching mmpretrain config, the model it builds and the data preprocessor the weights need.

    `card`: a model card, or its JSON (the dict a conversion is building).
    """
    card = ModelCard.from_json(card, where="the model card for mmpretrain")
    arch, size, pre = card.arch, card.input_size(), card.needs_preprocessing("mmpretrain's data_preprocessor needs it")
    zero_one = _is(pre.mean, ADVPROP_MEAN) and _is(pre.std, ADVPROP_STD)
    name = config_name(arch, size, zero_one)
    num_classes = card.num_classes
    head = (
        {"type": "LinearClsHead", "num_classes": num_classes, "in_channels": spec.head_channels(arch)}
        if num_classes
        else None
    )
    section = {
        "config": name,
        "get_model": model_name(arch, size, zero_one, card.variant),
        "model": {
            "type": "ImageClassifier",
            "backbone": {"type": "EfficientNet", "arch": arch},
            "neck": {"type": "GlobalAveragePooling"},
            "head": head,
        },
        "data_preprocessor": {"mean": list(pre.mean), "std": list(pre.std), "to_rgb": True},
        "checkpoint": "torch .pth: {'state_dict': ..., 'meta': model card}; .safetensors: the bare state dict",
    }
    section |= create_lines(section["get_model"], num_classes)
    config_norm = (ADVPROP_MEAN, ADVPROP_STD) if zero_one else (IMAGENET_MEAN, IMAGENET_STD)
    if (arch == "l2" and zero_one) or not (_is(pre.mean, config_norm[0]) and _is(pre.std, config_norm[1])):
        section["note"] = f"{name}'s data_preprocessor differs from this model's: use the data_preprocessor above"
    return section
