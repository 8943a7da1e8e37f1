"""CondConv-EfficientNet (tensorflow/tpu `models/official/efficientnet/condconv`), as data.

The B0 network (swish, squeeze-excite 0.25) whose last three stages (`_cc` in the official block
strings) are CondConv blocks: each of their three convolutions mixes 4 or 8 expert kernels with
per-example routing weights. Sizes from `efficientnet_condconv_builder.efficientnet_condconv_params`;
the builder's MEAN_RGB / STDDEV_RGB are the Lite/EdgeTPU ones, (x - 127) / 128.
"""

from __future__ import annotations

from dataclasses import replace

from effconv.models.families import efficientnet
from effconv.models.families.lite import EDGE_MEAN, EDGE_STD
from effconv.models.family import ArchSpec, Family, Preprocessing

FAMILY = Family(
    name="condconv",
    official_prefix="efficientnet-",
    stages=tuple(
        replace(stage, kind="condconv_mbconv") if index >= 4 else stage
        for index, stage in enumerate(efficientnet.FAMILY.stages)
    ),
    sizes=(
        ArchSpec("condconv-b0-4e", 1.0, 1.0, 224, 0.25, experts=4),
        ArchSpec("condconv-b0-8e", 1.0, 1.0, 224, 0.25, experts=8),
        ArchSpec("condconv-b0-8e-depth", 1.0, 1.1, 224, 0.25, experts=8),
    ),
    preprocessing=Preprocessing(EDGE_MEAN, EDGE_STD, "bicubic-tf1-legacy", 32),
)
