"""Training variants of the official checkpoints and the preprocessing each expects."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePath

from effconv.errors import UsageError
from effconv.models import spec
from effconv.models.families import FAMILIES

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


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("standard", "standard (ckpts/)", IMAGENET_MEAN, IMAGENET_STD, None),
        Variant("aa", "AutoAugment (ckptsaug/)", IMAGENET_MEAN, IMAGENET_STD, r"ckptsaug"),
        Variant("advprop", "AdvProp + AutoAugment", ADVPROP_MEAN, ADVPROP_STD, r"advprop"),
        Variant("noisystudent", "NoisyStudent", IMAGENET_MEAN, IMAGENET_STD, r"noisy[-_ ]?student"),
        Variant("randaug", "RandAugment", IMAGENET_MEAN, IMAGENET_STD, r"randaug"),
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
    """Native input size; the L2 checkpoint fine-tuned at 475 px says so in its name."""
    if spec.get_arch(arch).name == "l2" and re.search(r"l2[-_]475", str(path).lower()):
        return 475
    return spec.get_arch(arch).resolution


def preprocessing(variant: str, image_size: int, arch: str = "b0") -> dict:
    """The official evaluation preprocessing of `arch`'s family and `variant`, as recorded in the model card."""
    v = get_variant(variant)
    default = spec.family_of(arch).preprocessing
    # The variants name the B family's releases; `standard` means each family's own normalisation
    # (Lite and EdgeTPU: (x - 127) / 128), the others keep theirs whatever the family.
    mean, std = (default.mean, default.std) if v.name == "standard" else (v.mean, v.std)
    return {
        "image_size": image_size,
        "crop": "center",
        "crop_padding": default.crop_padding,
        "crop_fraction": round(image_size / (image_size + default.crop_padding), 6),
        "interpolation": default.interpolation,
        "input_range": "RGB 0-255, float, not clipped",
        "mean": list(mean),
        "std": list(std),
        "channel_order": "RGB",
        "layout": "NCHW",
    }
