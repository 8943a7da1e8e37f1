"""Hugging Face transformers' `EfficientNetForImageClassification`, as data: a `save_pretrained`-style folder.

Blocks are `efficientnet.encoder.blocks.{index}` (flat, as the official numbering); each block
nests its layers by phase (`expansion`, `depthwise_conv`, `squeeze_excite`, `projection`).
The folder holds `config.json` (the arch's hyper-parameters), `model.safetensors`,
`preprocessor_config.json` (`EfficientNetImageProcessor`) and effconv's model card (`model.json`).

transformers builds its convolutions with fixed padding: stride 1 "same" (symmetric, as TF 'SAME'
for odd kernels), stride 2 "valid" after a `ZeroPad2d` that is one-sided (even inputs, as TF) unless
the block is in `depthwise_padding` (symmetric, as TF for odd inputs); the stem always pads one-sided.
That is TF 'SAME' exactly at one input size: the card's, for which `depthwise_padding` is worked out.
"""

from __future__ import annotations

from effconv.card import ModelCard
from effconv.errors import UsageError
from effconv.mappings.tables import FolderLayout, LayoutTable
from effconv.models import spec

MODEL_CLASS = "EfficientNetForImageClassification"
PROCESSOR_CLASS = "EfficientNetImageProcessor"
BICUBIC = 3  # PIL.Image.BICUBIC, as transformers' `resample` takes it

# What transformers' EfficientNet hard-codes: a family must have these values to be expressed.
FIXED_FAMILY_FIELDS = {
    "stem_channels": 32,  # round_filters(config, 32)
    "head_channels": 1280,  # round_filters(config, 1280)
    "fix_stem_head": False,
    "se_base": "block_in",  # squeeze-excite width from the block's input
    "round_up_below": 0.9,  # round_filters adds a divisor below 90 %
    "padding": "tf-same",
}
# effconv's activation -> transformers' `hidden_act` (ACT2FN)
ACTIVATIONS = {"swish": "swish", "relu": "relu", "relu6": "relu6"}

# Measured with transformers 5.24.0 (tests/integration/test_hf_layout.py holds it to effconv's float32
# tolerance): the official b0 fixture converted with --layout hf, loaded by from_pretrained, against the
# official TF logits (EMA weights, 224px). effconv's own model measures 7.2e-05 there: float32 round-off.
MEASURED_LOGIT_DIFF = (
    "max |logit difference| 7.5e-05 against the official TensorFlow logits on the b0 fixture (max |logit| 6.9; "
    "effconv's own model: 7.2e-05), float32 at the card's input size"
)

_BLOCK = (
    ("dw_conv", "depthwise_conv.depthwise_conv"),
    ("dw_bn", "depthwise_conv.depthwise_norm"),
    ("se.reduce", "squeeze_excite.reduce"),
    ("se.expand", "squeeze_excite.expand"),
    ("project_conv", "projection.project_conv"),
    ("project_bn", "projection.project_bn"),
)


def _not_expressible(arch: str, image_size: int) -> list[str]:
    """Why transformers' EfficientNet cannot build `arch` exactly at `image_size` (empty: it can)."""
    family = spec.family_of(arch)
    why = [
        f"{name} {getattr(family, name)!r} (transformers fixes {want!r})"
        for name, want in FIXED_FAMILY_FIELDS.items()
        if getattr(family, name) != want
    ]
    if family.activation not in ACTIVATIONS:
        why.append(f"activation {family.activation!r}")
    kinds = {s.kind for s in family.stages}
    if kinds != {"mbconv"}:
        why.append(f"block kinds {sorted(kinds)} (transformers has mbconv only)")
    ratios = {s.se_ratio for s in family.stages}
    if len(ratios) != 1 or None in ratios:
        why.append("squeeze-excite not in every stage with one ratio")
    if image_size % 2:
        why.append(f"odd input size {image_size} (its stem pads one-sided, as TF 'SAME' for even sizes only)")
    return why


def _layouts_that_hold(arch: str, image_size: int) -> str:
    """The other layouts that hold `arch` at `image_size`, for the refusal: "native, timm or mmpretrain"."""
    from effconv.mappings.layouts import LAYOUT_CHECKS  # that registry imports this module

    holding = ["native"]
    for name, check in LAYOUT_CHECKS.items():
        if name == "hf":
            continue
        try:
            check(arch, image_size)
        except UsageError:
            continue
        holding.append(name)
    return " or ".join(filter(None, (", ".join(holding[:-1]), holding[-1])))


def check_expressible(arch: str, image_size: int) -> None:
    """Refuse, before any tensor is read, an arch or input size transformers' EfficientNet cannot express."""
    why = _not_expressible(arch, image_size)
    if why:
        raise UsageError(
            f"--layout hf cannot hold {spec.official_name(arch)} at {image_size}px (family "
            f"{spec.family_of(arch).name!r}): transformers' EfficientNet differs in {'; '.join(why)}; "
            f"use --layout {_layouts_that_hold(arch, image_size)}"
        )


def symmetric_stride2_blocks(arch: str, image_size: int) -> list[int]:
    """transformers' `depthwise_padding`: the stride-2 blocks whose input side is odd at `image_size`.

    TF 'SAME' pads a stride-2 conv one-sided (the extra pixel bottom/right) on an even side,
    symmetrically on an odd one; transformers pads one-sided except for the blocks listed.
    """
    side = -(-image_size // 2)  # after the stride-2 stem
    listed = []
    for block in spec.blocks(arch):
        if block.stride == 2:
            if side % 2:
                listed.append(block.index)
            side = -(-side // block.stride)
    return listed


def _labels(num_classes: int) -> dict[str, str]:
    from effconv.zoo.inference import class_names

    return {str(i): name for i, name in enumerate(class_names(num_classes))}


def config(card: ModelCard | dict) -> dict:
    """`config.json`: an `EfficientNetConfig` for the card's arch, classes and input size."""
    card = ModelCard.from_json(card, where="the model card for transformers")
    arch, size = spec.get_arch(card.arch), card.input_size()
    family, stages = spec.family_of(card.arch), spec.family_of(card.arch).stages
    id2label = _labels(card.num_classes)
    return {
        "architectures": [MODEL_CLASS],
        "model_type": "efficientnet",
        "num_channels": 3,
        "image_size": size,
        "width_coefficient": arch.width,
        "depth_coefficient": arch.depth,
        "depth_divisor": family.channel_divisor,
        "kernel_sizes": [s.kernel for s in stages],
        "in_channels": [s.in_channels for s in stages],
        "out_channels": [s.out_channels for s in stages],
        "depthwise_padding": symmetric_stride2_blocks(card.arch, size),
        "strides": [s.stride for s in stages],
        "num_block_repeats": [s.repeats for s in stages],
        "expand_ratios": [s.expand for s in stages],
        "squeeze_expansion_ratio": stages[0].se_ratio,
        "hidden_act": ACTIVATIONS[family.activation],
        "hidden_dim": spec.head_channels(card.arch),
        "pooling_type": "mean",
        "batch_norm_eps": family.bn_eps,
        "batch_norm_momentum": family.bn_momentum,  # handed to nn.BatchNorm2d as it is: PyTorch's convention
        "dropout_rate": arch.dropout,
        "drop_connect_rate": 0.2,  # the official survival probability 0.8
        "num_labels": card.num_classes,
        "id2label": id2label,
        "label2id": {name: int(i) for i, name in id2label.items()},
        "dtype": card.dtype or "float32",
    }


def preprocessor_config(card: ModelCard | dict) -> dict:
    """`preprocessor_config.json`: the card's resize, centre crop and mean/std for `EfficientNetImageProcessor`.

    The official crop (a centre square of `crop_fraction` of the short side, then resized) is
    its equivalent here: the short side resized to size / crop_fraction, then a centre crop.
    """
    card = ModelCard.from_json(card, where="the model card for transformers")
    size, pre = card.input_size(), card.needs_preprocessing("the image processor needs it")
    fraction = pre.crop_fraction or size / (size + (pre.crop_padding or 0))
    return {
        "image_processor_type": PROCESSOR_CLASS,
        "do_resize": True,
        "size": {"shortest_edge": round(size / fraction)},
        "resample": BICUBIC,
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "rescale_offset": False,
        "do_normalize": True,
        "image_mean": [round(m / 255.0, 8) for m in pre.mean],
        "image_std": [round(s / 255.0, 8) for s in pre.std],
        "include_top": False,  # True divides by std a second time
    }


def card_section(card: ModelCard | dict) -> dict:
    """What transformers needs beside the weights, and where its model is not the official one."""
    card = ModelCard.from_json(card, where="the model card for transformers")
    size = card.input_size()
    check_expressible(card.arch, size)
    return {
        "model_class": MODEL_CLASS,
        "create": f"transformers.{MODEL_CLASS}.from_pretrained(folder)",
        "image_processor": f"transformers.{PROCESSOR_CLASS}.from_pretrained(folder)",
        "files": ["config.json", FOLDER.weights, "preprocessor_config.json", "model.json"],
        "notes": [
            f"padding: transformers' fixed padding equals TF 'SAME' at {size}x{size} only (depthwise_padding "
            "is worked out for it); at other sizes the stride-2 convs pad differently from the official model "
            "(b0 converted for 224 and run at 240: logits off by up to 2.9): convert with --image-size N for "
            "the size you run at",
            f"parity: {MEASURED_LOGIT_DIFF}",
            "preprocessing: the image processor resizes with torchvision's bicubic, not TF1's legacy bicubic "
            "the official evaluation (and effconv predict/eval) uses: pixel values differ slightly",
        ],
    }


FOLDER = FolderLayout(
    weights="model.safetensors",
    files={"config.json": config, "preprocessor_config.json": preprocessor_config},
    metadata={"format": "pt"},  # from_pretrained refuses a safetensors file without it
)

TABLE = LayoutTable(
    name="hf",
    stem=(("stem.conv", "efficientnet.embeddings.convolution"), ("stem.bn", "efficientnet.embeddings.batchnorm")),
    blocks={
        "mbconv": (("expand_conv", "expansion.expand_conv"), ("expand_bn", "expansion.expand_bn"), *_BLOCK),
        "mbconv:no_expand": _BLOCK,
    },
    head=(("head.conv", "efficientnet.encoder.top_conv"), ("head.bn", "efficientnet.encoder.top_bn")),
    classifier=(("classifier", "classifier"),),
    block_scope="efficientnet.encoder.blocks.{index}.",
    library="transformers (EfficientNetForImageClassification.from_pretrained)",
    folder=FOLDER,
)
