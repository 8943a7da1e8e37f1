"""EfficientNetV2 b0-b3, S, M, L, XL (google/automl `efficientnetv2`), as data.

Fused-MBConv (`_c1` in the official block strings) in the first stages, MBConv with squeeze-excite
later; SiLU; no "+divisor when rounding lost 10 %" rule; the stem takes the first stage's input width.
b0-b3 scale one base table (`v2_base_block`) and evaluate with the V1 pipeline (`effnetv1_autoaug`:
ImageNet mean/std, TF1 bicubic, centre crop); S, M, L and XL have tables of their own and evaluate
with `preprocessing.preprocess_for_eval`: a centre crop only below 320 px (margin's odd pixel at the
bottom/right), `tf.image.resize` (bilinear, half-pixel centres) and (x - 128) / 128.
Tables and sizes from `effnetv2_configs.py` (`efficientnetv2_params`).
"""

from __future__ import annotations

from effconv.models.families.efficientnet import IMAGENET_MEAN, IMAGENET_STD
from effconv.models.family import ArchSpec, Family, Preprocessing, StageSpec


def _table(*rows: tuple[str, int, int, int, int, int, int]) -> tuple[StageSpec, ...]:
    """Stages from (kind, repeats, kernel, stride, expand, in, out); fused stages have no squeeze-excite."""
    return tuple(
        StageSpec(kind, *numbers, se_ratio=None if kind == "fused_mbconv" else 0.25) for kind, *numbers in rows
    )


F, M = "fused_mbconv", "mbconv"
BASE = _table(
    (F, 1, 3, 1, 1, 32, 16),
    (F, 2, 3, 2, 4, 16, 32),
    (F, 2, 3, 2, 4, 32, 48),
    (M, 3, 3, 2, 4, 48, 96),
    (M, 5, 3, 1, 6, 96, 112),
    (M, 8, 3, 2, 6, 112, 192),
)
S = _table(
    (F, 2, 3, 1, 1, 24, 24),
    (F, 4, 3, 2, 4, 24, 48),
    (F, 4, 3, 2, 4, 48, 64),
    (M, 6, 3, 2, 4, 64, 128),
    (M, 9, 3, 1, 6, 128, 160),
    (M, 15, 3, 2, 6, 160, 256),
)
M_ = _table(
    (F, 3, 3, 1, 1, 24, 24),
    (F, 5, 3, 2, 4, 24, 48),
    (F, 5, 3, 2, 4, 48, 80),
    (M, 7, 3, 2, 4, 80, 160),
    (M, 14, 3, 1, 6, 160, 176),
    (M, 18, 3, 2, 6, 176, 304),
    (M, 5, 3, 1, 6, 304, 512),
)
L = _table(
    (F, 4, 3, 1, 1, 32, 32),
    (F, 7, 3, 2, 4, 32, 64),
    (F, 7, 3, 2, 4, 64, 96),
    (M, 10, 3, 2, 4, 96, 192),
    (M, 19, 3, 1, 6, 192, 224),
    (M, 25, 3, 2, 6, 224, 384),
    (M, 7, 3, 1, 6, 384, 640),
)
XL = _table(
    (F, 4, 3, 1, 1, 32, 32),
    (F, 8, 3, 2, 4, 32, 64),
    (F, 8, 3, 2, 4, 64, 96),
    (M, 16, 3, 2, 4, 96, 192),
    (M, 24, 3, 1, 6, 192, 256),
    (M, 32, 3, 2, 6, 256, 512),
    (M, 8, 3, 1, 6, 512, 640),
)

V1_PIPELINE = Preprocessing(IMAGENET_MEAN, IMAGENET_STD, "bicubic-tf1-legacy", 32)
V2_PIPELINE = Preprocessing((128.0,) * 3, (128.0,) * 3, "bilinear-tf2", 32, crop_below=320, crop_offset="floor")

FAMILY = Family(
    name="v2",
    official_prefix="efficientnetv2-",
    stages=BASE,
    sizes=(
        ArchSpec("v2-b0", 1.0, 1.0, 224, 0.2, official="b0"),
        ArchSpec("v2-b1", 1.0, 1.1, 240, 0.2, official="b1"),
        ArchSpec("v2-b2", 1.1, 1.2, 260, 0.3, official="b2"),
        ArchSpec("v2-b3", 1.2, 1.4, 300, 0.3, official="b3"),
        ArchSpec("v2-s", 1.0, 1.0, 384, 0.2, official="s", stages=S, preprocessing=V2_PIPELINE),
        ArchSpec("v2-m", 1.0, 1.0, 480, 0.3, official="m", stages=M_, preprocessing=V2_PIPELINE),
        ArchSpec("v2-l", 1.0, 1.0, 480, 0.4, official="l", stages=L, preprocessing=V2_PIPELINE),
        ArchSpec("v2-xl", 1.0, 1.0, 512, 0.4, official="xl", stages=XL, preprocessing=V2_PIPELINE),
    ),
    preprocessing=V1_PIPELINE,
    stem_channels=None,
    round_up_below=None,
    bn_momentum=0.1,  # TF's 0.9
)
