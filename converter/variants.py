"""Training variants of the official checkpoints and the preprocessing each expects."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePath

from effconv.errors import UsageError
from effconv.models import spec
from effconv.models.families import FAMILIES
from effconv.models.families.v2 import V2_PIPELINE
from effconv.models.family import Preprocessing

_B = FAMILIES["efficientnet"].preprocessing
IMAGENET_MEAN = _B.mean
IMAGENET_STD = _B.std
ADVPROP_MEAN = (127.5, 127.5, 127.5)
ADVPROP_STD = (127.5, 127.5, 127.5)
CROP_PADDING = _B.crop_padding  # 32: as when the checkpoints were released
INTERPOLATION = _B.interpolation  # tf.compat.v1.image.resize_bicubic, no half-pixel centres


@dataclass(frozen=True)
class Variant:
    name: str
    title: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    path_pattern: str | None  # matches official download names that prove this variant
    # The whole evaluation pipeline of these releases where it is not the arch's own (None: the arch's), and
    # their evaluation size where it is not the arch's native one.
    pipeline: Preprocessing | None = None
    image_size: int | None = None


# EfficientNetV2's ImageNet-21k releases, by google/automl `datasets.py`, whose dataset configs override the
# model's: `ImageNet21k` trains and evaluates every size at 224 px with augname=None, so even b0-b3 evaluate with
# `preprocessing.preprocess_for_eval` (crop below 320 px, bilinear, (x - 128) / 128), not their V1 pipeline;
# `ImagenetFt` (the -21k-ft1k fine-tuning) evaluates at the model's own size with augname='ft':
# `preprocess_for_finetune`, (x / 255 - 0.5) / 0.5 and a bilinear resize of the whole image, no crop at any size.
IN21K_PIPELINE = V2_PIPELINE  # the S-XL 1k pipeline: crop below 320 px, bilinear, (x - 128) / 128
# crop_below=0: never cropped
IN21K_FT1K_PIPELINE = Preprocessing(ADVPROP_MEAN, ADVPROP_STD, "bilinear-tf2", CROP_PADDING, crop_below=0)
IN21K_SIZE = 224


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("standard", "standard (ckpts/)", IMAGENET_MEAN, IMAGENET_STD, None),
        Variant("aa", "AutoAugment (ckptsaug/)", IMAGENET_MEAN, IMAGENET_STD, r"ckptsaug"),
        Variant("advprop", "AdvProp + AutoAugment", ADVPROP_MEAN, ADVPROP_STD, r"advprop"),
        Variant("noisystudent", "NoisyStudent", IMAGENET_MEAN, IMAGENET_STD, r"noisy[-_ ]?student"),
        Variant("randaug", "RandAugment", IMAGENET_MEAN, IMAGENET_STD, r"randaug"),
        Variant(
            "in21k",
            "EfficientNetV2 ImageNet-21k (v2/efficientnetv2-*-21k)",
            IN21K_PIPELINE.mean,
            IN21K_PIPELINE.std,
            r"efficientnetv2-[a-z0-9]+-21k(?![-_]?ft)",
            pipeline=IN21K_PIPELINE,
            image_size=IN21K_SIZE,
        ),
        Variant(
            "in21k-ft1k",
            "EfficientNetV2 ImageNet-21k fine-tuned on 1k (v2/efficientnetv2-*-21k-ft1k)",
            IN21K_FT1K_PIPELINE.mean,
            IN21K_FT1K_PIPELINE.std,
            r"efficientnetv2-[a-z0-9]+-21k[-_]?ft1k",
            pipeline=IN21K_FT1K_PIPELINE,
        ),
    )
}


def get_variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise UsageError(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)}")
    return VARIANTS[name]


def detect_variant(path: str | PurePath) -> str | None:
    """The variant that the official file or folder names in `path` prove, else None."""
    text = str(path).lower()
    found = [v.name for v in VARIANTS.values() if v.path_pattern and re.search(v.path_pattern, text)]
    return found[0] if len(found) == 1 else None


def detect_image_size(arch: str, path: str | PurePath) -> int:
    """Native input size; the L2 checkpoint fine-tuned at 475 px says so in its name, and the EfficientNetV2
    ImageNet-21k releases (`-21k`, evaluated at 224 px by the official code) in theirs."""
    if spec.get_arch(arch).name == "l2" and re.search(r"l2[-_]475", str(path).lower()):
        return 475
    variant = detect_variant(path)
    if variant is not None and VARIANTS[variant].image_size is not None:
        return VARIANTS[variant].image_size
    return spec.get_arch(arch).resolution


def preprocessing(variant: str, image_size: int, arch: str = "b0") -> dict:
    """The official evaluation preprocessing of `arch`'s family and `variant`, as recorded in the model card."""
    v = get_variant(variant)
    default = v.pipeline or spec.preprocessing_of(arch)
    # The variants name the B family's releases; `standard` means each family's own normalisation
    # (Lite, EdgeTPU, CondConv: (x - 127) / 128; EfficientNetV2 S-XL: (x - 128) / 128), the others keep
    # theirs whatever the family; EfficientNetV2's 21k variants bring their whole pipeline.
    mean, std = (default.mean, default.std) if v.name == "standard" else (v.mean, v.std)
    crops = default.crop_below is None or image_size < default.crop_below
    extra = {} if default.crop_offset == "ceil" else {"crop_offset": default.crop_offset}
    if default.trainer_interpolation:
        extra["trainer_interpolation"] = default.trainer_interpolation
    return {
        "image_size": image_size,
        "crop": "center" if crops else "none",
        "crop_padding": default.crop_padding,
        "crop_fraction": round(image_size / (image_size + default.crop_padding), 6) if crops else 1.0,
        **extra,
        "interpolation": default.interpolation,
        "input_range": "RGB 0-255, float, not clipped",
        "mean": list(mean),
        "std": list(std),
        "channel_order": "RGB",
        "layout": "NCHW",
    }
