"""mmpretrain's `ImageClassifier` with the `EfficientNet` or `EfficientNetV2` backbone and `LinearClsHead`, as data.

The backbone's `layers.0` is the stem; in `EfficientNet` every stride-1 stage
after the first joins the stage before it (stages 4+5 and 6+7 of the base
network), while `EfficientNetV2` gives every stage its own layer
(`layers_by_stage`); the head conv is the layer after the last block layer.
Each conv is a ConvModule (`.conv`, `.bn`); the squeeze-excite convs are
ConvModules without a norm; an edge residual block (mmpretrain's EdgeResidual,
also V2's fused MBConv) is `conv1` (k x k expand) and `conv2` (1x1 project); a
fused block without expansion is one ConvModule (V2's EnhancedConvModule).

mmpretrain builds the B family (b0-b8, l2), EdgeTPU (arch `es`, `em`, `el`) and
EfficientNetV2 (b0-b3, s, m, l, xl); `BACKBONES` says which effconv archs it
builds exactly as the official code does, and every other arch (CondConv, Lite,
EdgeTPU-L) is refused before any tensor is read.
"""

from __future__ import annotations

from effconv.card import ModelCard
from effconv.errors import UsageError
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

_EDGE_RESIDUAL = (  # mmpretrain's EdgeResidual
    ("expand_conv", "conv1.conv"),
    ("expand_bn", "conv1.bn"),
    ("project_conv", "conv2.conv"),
    ("project_bn", "conv2.bn"),
)

TABLE = LayoutTable(
    name="mmpretrain",
    stem=(("stem.conv", "backbone.layers.0.conv"), ("stem.bn", "backbone.layers.0.bn")),
    blocks={
        "mbconv": (("expand_conv", "expand_conv.conv"), ("expand_bn", "expand_conv.bn"), *_BLOCK),
        "mbconv:no_expand": _BLOCK,
        "edge_residual": _EDGE_RESIDUAL,
        "fused_mbconv": _EDGE_RESIDUAL,  # EfficientNetV2's FusedMBConv is mmpretrain's EdgeResidual
        "fused_mbconv:no_expand": (("project_conv", "conv"), ("project_bn", "bn")),  # V2's EnhancedConvModule
    },
    head=(("head.conv", "backbone.layers.{head_layer}.conv"), ("head.bn", "backbone.layers.{head_layer}.bn")),
    classifier=(("classifier", "head.fc"),),
    block_scope="backbone.layers.{layer}.{layer_pos}.",
    library="mmpretrain",
    checkpoint_key="state_dict",
    layers_by_stage=frozenset({"v2"}),  # EfficientNetV2: layers.{stage_number}.{pos}, the head after the last stage
)


_B_ARCHS = ("b0", "b1", "b2", "b3", "b4", "b5", "b6", "b7", "b8", "l2")
_V2_ARCHS = ("v2-b0", "v2-b1", "v2-b2", "v2-b3", "v2-s", "v2-m", "v2-l", "v2-xl")
_RELU = {"type": "ReLU"}
_V1, _V2 = "EfficientNet", "EfficientNetV2"
# Family -> {effconv arch: the backbone config that builds it as the official model does}. A B-family backbone
# takes mmpretrain's default activation (Swish); EdgeTPU's configs set ReLU. EfficientNetV2's defaults (Swish, BN
# eps 1e-3, TF 'SAME' padding at stride 2 and k // 2 on both sides at stride 1, which is 'SAME' for its odd
# kernels) are the official model at any input size.
BACKBONES: dict[str, dict[str, dict]] = {
    "efficientnet": {a: {"type": _V1, "arch": a} for a in _B_ARCHS},
    "edgetpu": {
        "edgetpu-s": {"type": _V1, "arch": "es", "act_cfg": _RELU},
        "edgetpu-m": {"type": _V1, "arch": "em", "act_cfg": _RELU},
    },
    "v2": {a: {"type": _V2, "arch": a.removeprefix("v2-")} for a in _V2_ARCHS},
}
# Archs mmpretrain has a backbone arch for that is not the official model (the mmpretrain-side test checks the
# widths named here against the real backbone).
NOT_OFFICIAL = {
    "edgetpu-l": "mmpretrain's arch 'el' sizes block 0's expand conv from the 40-channel stem (40 x 3 = 120 "
    "channels), the official EdgeTPU-L from the block's nominal 32-channel input (32 x 4 = 128)",
}
# The EdgeTPU configs mmpretrain ships (no pretrained models): their data preprocessor is (x - 127.5) / 127.5.
EDGETPU_CONFIGS = {"edgetpu-s": "efficientnet-es_8xb32-01norm_in1k", "edgetpu-m": "efficientnet-em_8xb32-01norm_in1k"}


def backbone(arch: str) -> dict:
    """The `EfficientNet` backbone config of `arch`; an arch mmpretrain cannot build as the official one is refused."""
    name, family = spec.official_name(arch), spec.family_of(arch).name
    short = spec.get_arch(arch).name
    if short in NOT_OFFICIAL:
        raise UsageError(f"--layout mmpretrain cannot hold {name}: {NOT_OFFICIAL[short]}; use --layout native or timm")
    if short not in BACKBONES.get(family, {}):
        have = "; ".join(f"{f} {'/'.join(archs)}" for f, archs in BACKBONES.items())
        raise UsageError(
            f"--layout mmpretrain cannot hold {name}: mmpretrain has no model of the {family!r} family "
            f"(its EfficientNet and EfficientNetV2 backbones build {have}); use --layout native or timm"
        )
    return dict(BACKBONES[family][short])


def check_expressible(arch: str, image_size: int) -> None:
    """Refuse, before any tensor is read, an arch mmpretrain's EfficientNet cannot build (any size is exact)."""
    backbone(arch)


def _is(values, reference) -> bool:
    return all(abs(float(a) - b) <= 1e-6 * max(1.0, abs(b)) for a, b in zip(values, reference, strict=True))


# EfficientNetV2's configs (mmpretrain 1.2): b0-b3 normalise with ImageNet's mean/std, S-XL (x - 127.5) / 127.5;
# the ImageNet-21k ones (S-XL) too.
V2_CONFIGS = {
    "v2-b0": "efficientnetv2-b0_8xb32_in1k",
    "v2-b1": "efficientnetv2-b1_8xb32_in1k",
    "v2-b2": "efficientnetv2-b2_8xb32_in1k",
    "v2-b3": "efficientnetv2-b3_8xb32_in1k",
    "v2-s": "efficientnetv2-s_8xb32_in1k-384px",
    "v2-m": "efficientnetv2-m_8xb32_in1k-480px",
    "v2-l": "efficientnetv2-l_8xb32_in1k-480px",
    "v2-xl": "efficientnetv2-xl_8xb32_in1k-512px",
}
V2_IN21K_CONFIG = "efficientnetv2-{arch}_8xb32_in21k"  # s, m, l, xl
_V2_IMAGENET_NORM = ("v2-b0", "v2-b1", "v2-b2", "v2-b3")


def config_name(arch: str, image_size: int, zero_one_norm: bool, variant: str | None = None) -> str:
    """The mmpretrain config that builds this model with the matching data preprocessor."""
    if arch in EDGETPU_CONFIGS:
        return EDGETPU_CONFIGS[arch]
    if arch in V2_CONFIGS:
        short = arch.removeprefix("v2-")
        return V2_IN21K_CONFIG.format(arch=short) if variant == "in21k" and short in _V2_21K else V2_CONFIGS[arch]
    if arch == "l2":
        return "efficientnet-l2_8xb32_in1k-475px" if image_size == 475 else "efficientnet-l2_8xb8_in1k-800px"
    return f"efficientnet-{arch}_8xb32{'-01norm' if zero_one_norm else ''}_in1k"


def _config_norm(arch: str, zero_one_norm: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std of `config_name`'s data preprocessor."""
    if arch in V2_CONFIGS:
        zero_one = arch not in _V2_IMAGENET_NORM
        return (ADVPROP_MEAN, ADVPROP_STD) if zero_one else (IMAGENET_MEAN, IMAGENET_STD)
    zero_one = zero_one_norm or arch in EDGETPU_CONFIGS
    return (ADVPROP_MEAN, ADVPROP_STD) if zero_one else (IMAGENET_MEAN, IMAGENET_STD)


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
_V2_21K = ("s", "m", "l", "xl")
# mmpretrain (1.2)'s EfficientNetV2 models by training variant (the same test checks this table too); each
# normalises as its config (`_config_norm`), so the card names one only where that is the card's normalisation.
V2_MODELS = {
    "standard": ("efficientnetv2-{arch}_3rdparty_in1k", ("b0", "b1", "b2", "b3", "s", "m", "l")),
    "in21k": ("efficientnetv2-{arch}_3rdparty_in21k", _V2_21K),
    "in21k-ft1k": ("efficientnetv2-{arch}_in21k-pre_3rdparty_in1k", _V2_21K),
}
# In the card's `create` lines, the path of the weights file beside the card.
WEIGHTS_VARIABLE = "weights"


def model_name(arch: str, image_size: int, zero_one_norm: bool, variant: str | None = None) -> str | None:
    """A `mmpretrain.get_model` name for this model: the variant's own where mmpretrain has it, else one built
    from `config_name`'s config (the data preprocessor that fits); its weights are replaced by ours. None where
    mmpretrain has no model of the arch with the card's normalisation (EdgeTPU, an ImageNet-normalised b8,
    EfficientNetV2 S-XL's (x - 128) / 128)."""
    if arch in V2_CONFIGS:  # the variant's own model; `card_section` keeps it where it normalises as the card
        name, archs = V2_MODELS.get(variant or "", ("", ()))
        short = arch.removeprefix("v2-")
        return name.format(arch=short) if short in archs else None
    if spec.family_of(arch).name != "efficientnet":
        return None
    if arch == "l2":
        return f"efficientnet-l2_3rdparty-ra-noisystudent_in1k-{475 if image_size == 475 else 800}px"
    name, archs = VARIANT_MODELS.get(variant or "", ("", ()))
    if arch in archs and (variant == "advprop") == zero_one_norm:  # its data preprocessor fits the card's
        return name.format(arch=arch)
    if zero_one_norm:
        return f"efficientnet-{arch}_3rdparty_8xb32-aa-advprop_in1k"
    return None if arch == "b8" else f"efficientnet-{arch}_3rdparty_8xb32-aa_in1k"  # no ImageNet-norm b8 model


def create_lines(name: str | None, num_classes: int, config: dict | None = None) -> dict[str, str]:
    """How to build the model with these weights: `get_model`, its head sized for the card's classes.

    mmpretrain's `get_model(name, pretrained=file)` alone keeps the config's 1000-class head: on another
    class count it warns "size mismatch" and leaves that head random. mmengine reads torch files only, so a
    .safetensors is loaded into the built model. Without a model `name` (mmpretrain has none of the arch),
    `get_model` builds from `config` ({"model": ..., "data_preprocessor": ...}) as an `mmengine.Config`.
    """
    if name is not None:
        head = f"head=dict(num_classes={num_classes})" if num_classes else "head=None"
        model, arguments = repr(name), f", {head}"
    elif config is not None:
        model, arguments = f"mmengine.Config({config!r})", ""  # the config's head has the card's classes
    else:
        return {}
    return {
        "create": f"get_model({model}, pretrained={WEIGHTS_VARIABLE}{arguments})",
        "create_safetensors": (
            f"model = get_model({model}{arguments}); "
            f"model.load_state_dict(safetensors.torch.load_file({WEIGHTS_VARIABLE}), strict=True)"
        ),
        "weights": f"in the create lines, {WEIGHTS_VARIABLE} is the path of the weights file beside this card "
        "(create: the .pth; create_safetensors: the .safetensors)"
        + ("" if name is not None else "; they need `import mmengine`"),
    }


def card_section(card: ModelCard | dict) -> dict:
    """The matching mmpretrain config, the model it builds and the data preprocessor the weights need.

    `card`: a model card, or its JSON (the dict a conversion is building).
    """
    card = ModelCard.from_json(card, where="the model card for mmpretrain")
    arch, size, pre = card.arch, card.input_size(), card.needs_preprocessing("mmpretrain's data_preprocessor needs it")
    model_backbone = backbone(arch)  # refuses an arch mmpretrain cannot build
    zero_one = _is(pre.mean, ADVPROP_MEAN) and _is(pre.std, ADVPROP_STD)
    name = config_name(arch, size, zero_one, card.variant)
    config_norm = _config_norm(arch, zero_one)
    norm_fits = _is(pre.mean, config_norm[0]) and _is(pre.std, config_norm[1])
    get_model = model_name(arch, size, zero_one, card.variant)
    if arch in V2_CONFIGS and not norm_fits:  # that model's data preprocessor is not the card's
        get_model = None
    num_classes = card.num_classes
    head = (
        {"type": "LinearClsHead", "num_classes": num_classes, "in_channels": spec.head_channels(arch)}
        if num_classes
        else None
    )
    section = {
        "config": name,
        "get_model": get_model,
        "model": {
            "type": "ImageClassifier",
            "backbone": model_backbone,
            "neck": {"type": "GlobalAveragePooling"},
            "head": head,
        },
        "data_preprocessor": {"mean": list(pre.mean), "std": list(pre.std), "to_rgb": True},
        "checkpoint": "torch .pth: {'state_dict': ..., 'meta': model card}; .safetensors: the bare state dict",
    }
    config = {"model": section["model"], "data_preprocessor": section["data_preprocessor"]}
    section |= create_lines(section["get_model"], num_classes, config)
    if (arch == "l2" and zero_one) or not norm_fits:
        section["note"] = f"{name}'s data_preprocessor differs from this model's: use the data_preprocessor above"
    return section
