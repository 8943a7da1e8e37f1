"""EfficientNet-Lite0..4 (tensorflow/tpu `models/official/efficientnet/lite`), as data.

The B0 stage table without squeeze-excite (the official block strings still say se0.25, but the
builder sets use_se=False), ReLU6, and stem, head and the first and last stage's repeats not scaled
(fix_head_stem). Sizes from `efficientnet_lite_builder.efficientnet_lite_params`.
"""

from __future__ import annotations

from dataclasses import replace

from effconv.models.families import efficientnet
from effconv.models.family import ArchSpec, Family, Preprocessing

# MEAN_RGB / STDDEV_RGB of the Lite and EdgeTPU builders ("inception-style", for quantization).
EDGE_MEAN = (127.0, 127.0, 127.0)
EDGE_STD = (128.0, 128.0, 128.0)

FAMILY = Family(
    name="lite",
    official_prefix="efficientnet-",
    stages=tuple(replace(stage, se_ratio=None) for stage in efficientnet.FAMILY.stages),
    sizes=(
        ArchSpec("lite0", 1.0, 1.0, 224, 0.2),
        ArchSpec("lite1", 1.0, 1.1, 240, 0.2),
        ArchSpec("lite2", 1.1, 1.2, 260, 0.3),
        ArchSpec("lite3", 1.2, 1.4, 280, 0.3),
        ArchSpec("lite4", 1.4, 1.8, 300, 0.3),
    ),
    # eval_ckpt_main.py's resize (TF1 bicubic) and crop padding 32; the trainer's evaluation (main.py) resized
    # Lite with TF1 bilinear: recorded in the card beside it (docs/families.md says why the card takes bicubic)
    preprocessing=Preprocessing(
        EDGE_MEAN, EDGE_STD, "bicubic-tf1-legacy", 32, trainer_interpolation="bilinear-tf1-legacy"
    ),
    fix_stem_head=True,
    activation="relu6",
)
