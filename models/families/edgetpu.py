"""EfficientNet-EdgeTPU S/M/L (tensorflow/tpu `models/official/efficientnet/edgetpu`), as data.

ReLU, no squeeze-excite, 1001 classes in the releases (0 = background). The first three stages
(`_c1` in the official block strings) are edge-residual blocks (`MBConvBlockWithoutDepthwise`); the
first stage has no shortcut (`noskip`). Stem and head are width-scaled. Stage table from
`efficientnet_edgetpu_builder.efficientnet_edgetpu`, sizes from `efficientnet_edgetpu_params`.
"""

from __future__ import annotations

from effconv.models.families.lite import EDGE_MEAN, EDGE_STD
from effconv.models.family import ArchSpec, Family, Preprocessing, StageSpec

FAMILY = Family(
    name="edgetpu",
    official_prefix="efficientnet-",
    stages=(
        StageSpec("edge_residual", 1, 3, 1, 4, 24, 24, None, residual=False),
        StageSpec("edge_residual", 2, 3, 2, 8, 24, 32, None),
        StageSpec("edge_residual", 4, 3, 2, 8, 32, 48, None),
        StageSpec("mbconv", 5, 5, 2, 8, 48, 96, None),
        StageSpec("mbconv", 4, 5, 1, 8, 96, 144, None),
        StageSpec("mbconv", 2, 5, 2, 8, 144, 192, None),
    ),
    sizes=(
        ArchSpec("edgetpu-s", 1.0, 1.0, 224, 0.2, official="edgetpu-S"),
        ArchSpec("edgetpu-m", 1.0, 1.1, 240, 0.2, official="edgetpu-M"),
        ArchSpec("edgetpu-l", 1.2, 1.4, 300, 0.3, official="edgetpu-L"),
    ),
    preprocessing=Preprocessing(EDGE_MEAN, EDGE_STD, "bicubic-tf1-legacy", 32),
    activation="relu",
)
