"""EfficientNet b0-b8 and l2 (tensorflow/tpu `models/official/efficientnet`), as data."""

from __future__ import annotations

from effconv.models.family import ArchSpec, Family, Preprocessing, StageSpec

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

FAMILY = Family(
    name="efficientnet",
    official_prefix="efficientnet-",
    stages=(
        StageSpec("mbconv", 1, 3, 1, 1, 32, 16),
        StageSpec("mbconv", 2, 3, 2, 6, 16, 24),
        StageSpec("mbconv", 2, 5, 2, 6, 24, 40),
        StageSpec("mbconv", 3, 3, 2, 6, 40, 80),
        StageSpec("mbconv", 3, 5, 1, 6, 80, 112),
        StageSpec("mbconv", 4, 5, 2, 6, 112, 192),
        StageSpec("mbconv", 1, 3, 1, 6, 192, 320),
    ),
    sizes=(
        ArchSpec("b0", 1.0, 1.0, 224, 0.2),
        ArchSpec("b1", 1.0, 1.1, 240, 0.2),
        ArchSpec("b2", 1.1, 1.2, 260, 0.3),
        ArchSpec("b3", 1.2, 1.4, 300, 0.3),
        ArchSpec("b4", 1.4, 1.8, 380, 0.4),
        ArchSpec("b5", 1.6, 2.2, 456, 0.4),
        ArchSpec("b6", 1.8, 2.6, 528, 0.5),
        ArchSpec("b7", 2.0, 3.1, 600, 0.5),
        ArchSpec("b8", 2.2, 3.6, 672, 0.5),
        ArchSpec("l2", 4.3, 5.3, 800, 0.5),
    ),
    # crop_padding 32: as when the checkpoints were released (FACTS.md section 6)
    preprocessing=Preprocessing(IMAGENET_MEAN, IMAGENET_STD, "bicubic-tf1-legacy", 32),
)
