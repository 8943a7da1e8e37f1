"""EfficientNet-Lite0..4 (tensorflow/tpu `models/official/efficientnet/lite`), as data.

The B0 stage table without squeeze-excite (the official block strings still say se0.25, but the
builder sets use_se=False), ReLU6, and stem, head and the first and last stage's repeats not scaled
(fix_head_stem). Sizes from `efficientnet_lite_builder.efficientnet_lite_params`.
"""

from __future__ import annotations

from effconv.models.family import ArchSpec, Family, Preprocessing, StageSpec

# MEAN_RGB / STDDEV_RGB of the Lite and EdgeTPU builders ("inception-style", for quantization).
EDGE_MEAN = (127.0, 127.0, 127.0)
EDGE_STD = (128.0, 128.0, 128.0)

FAMILY = Family(
    name="lite",
    official_prefix="efficientnet-",
    stages=(
        StageSpec("mbconv", 1, 3, 1, 1, 32, 16, None),
        StageSpec("mbconv", 2, 3, 2, 6, 16, 24, None),
        StageSpec("mbconv", 2, 5, 2, 6, 24, 40, None),
        StageSpec("mbconv", 3, 3, 2, 6, 40, 80, None),
        StageSpec("mbconv", 3, 5, 1, 6, 80, 112, None),
        StageSpec("mbconv", 4, 5, 2, 6, 112, 192, None),
        StageSpec("mbconv", 1, 3, 1, 6, 192, 320, None),
    ),
    sizes=(
        ArchSpec("lite0", 1.0, 1.0, 224, 0.2),
        ArchSpec("lite1", 1.0, 1.1, 240, 0.2),
        ArchSpec("lite2", 1.1, 1.2, 260, 0.3),
        ArchSpec("lite3", 1.2, 1.4, 280, 0.3),
        ArchSpec("lite4", 1.4, 1.8, 300, 0.3),
    ),
    # eval_ckpt_main.py's default resize (TF1 bicubic) and crop padding 32
    preprocessing=Preprocessing(EDGE_MEAN, EDGE_STD, "bicubic-tf1-legacy", 32),
    fix_stem_head=True,
    activation="relu6",
)
