"""Keras itself as `effconv verify`'s reference for a Keras .h5 source.

Legacy Keras (`tf_keras`, the Keras 2 that Keras applications' own files were written with) builds
`keras.applications.EfficientNet<arch>` for the input size at hand (a fixed input shape: only then does
Keras pad stride-2 convs like TF 'SAME'), loads the file's weights into it, and runs it. Its outputs line up
with effconv's endpoints layer by layer: `stem_activation`, each block's last layer (its `add`, or its
`project_bn` where the block has no residual), `top_activation`, `avg_pool`, `predictions`.

The converted model takes input already normalised; the Keras graph normalises inside (Rescaling,
Normalization, ...). The reference maps its input back through the graph's own steps before stem_conv,
measured on the built model, so that both sides see the same tensor at stem_conv whatever those steps are;
the card's folded mean/std is checked by the conversion tests, not here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from effconv.errors import UsageError

# Keras layer whose output is each of effconv's endpoints (blocks: found by name, see `_block_outputs`).
ENDPOINT_LAYERS = {"stem": "stem_activation", "head_1x1": "top_activation", "pooled_features": "avg_pool"}
LOGITS_LAYER = "predictions"
_FIRST_LAYER = "stem_conv_pad"  # its input is the normalised image
_BLOCK_LAYER = re.compile(r"^block(\d+)([a-z])_")


def legacy_keras():
    """`tf_keras`, imported on first use: only verify of a Keras source needs it."""
    try:
        import tf_keras
    except ImportError as e:
        raise UsageError(
            f"verify of a Keras .h5 source runs Keras itself and needs tf-keras ({e}): pip install tf-keras"
        ) from e
    return tf_keras


def _block_outputs(layer_names: list[str]) -> list[str]:
    """Each block's last layer, blocks in order (block1a, block1b, block2a, ...)."""
    last: dict[tuple[int, str], str] = {}
    for name in layer_names:
        if m := _BLOCK_LAYER.match(name):
            last[(int(m[1]), m[2])] = name
    return [last[key] for key in sorted(last)]


class KerasReferenceModel:
    """`__call__(x_nhwc, endpoints=False)`: logits (pooled features without a head), or every endpoint.

    `path`: the .h5 file (a whole model or weights only); `arch` and `num_classes` as detected from it.
    """

    def __init__(self, path, arch: str, num_classes: int, num_blocks: int):
        self.path, self.arch, self.num_classes, self.num_blocks = str(path), arch, num_classes, num_blocks
        self._built: dict[tuple[int, int], tuple] = {}

    def _build(self, height: int, width: int):
        keras = legacy_keras()
        top = bool(self.num_classes)
        application = getattr(keras.applications, f"EfficientNet{self.arch.upper()}")
        model = application(
            weights=None,
            include_top=top,
            classes=self.num_classes or 1000,
            input_shape=(height, width, 3),
            pooling=None if top else "avg",
            classifier_activation=None,
        )
        model.load_weights(self.path)
        for layer in model.layers:  # a Normalization's mean/variance are derived from its loaded weights
            if hasattr(layer, "finalize_state") and type(layer).__name__ == "Normalization":
                layer.finalize_state()
        names = [layer.name for layer in model.layers]
        blocks = _block_outputs(names)
        if len(blocks) != self.num_blocks:
            raise UsageError(f"Keras built {len(blocks)} blocks for {self.arch}, the file holds {self.num_blocks}")
        layers = {**ENDPOINT_LAYERS, **{f"block_{i}": name for i, name in enumerate(blocks)}}
        layers["features"] = blocks[-1]
        if top:
            layers["logits"] = LOGITS_LAYER
        outputs = {k: model.get_layer(name).output for k, name in layers.items()}
        runner = keras.Model(model.inputs, outputs)
        scale, shift = self._input_steps(keras, model, height, width)
        return runner, scale, shift

    @staticmethod
    def _input_steps(keras, model, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """The graph's steps before stem_conv as one per-channel affine map, measured: y = scale * x + shift.

        Measured between 0 and 255 (the pixel range), not over one unit: float32 steps such as `x / 255` then
        give the scale to float32 precision rather than to ~1e-5 of itself.
        """
        steps = keras.Model(model.inputs, model.get_layer(_FIRST_LAYER).input)
        zeros = np.asarray(steps(np.zeros((1, height, width, 3), np.float32), training=False), np.float64)
        full = np.asarray(steps(np.full((1, height, width, 3), 255, np.float32), training=False), np.float64)
        shift, scale = zeros[0, 0, 0], (full[0, 0, 0] - zeros[0, 0, 0]) / 255
        if np.any(scale <= 0):
            raise UsageError(f"the Keras graph's input steps scale a channel by {scale.tolist()}: cannot invert them")
        return scale, shift

    def __call__(self, x_nhwc: np.ndarray, endpoints: bool = False) -> np.ndarray | Mapping[str, np.ndarray]:
        x = np.asarray(x_nhwc, dtype=np.float64)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected an NHWC batch with 3 channels, got shape {x.shape}")
        key = (int(x.shape[1]), int(x.shape[2]))
        if key not in self._built:
            self._built[key] = self._build(*key)
        runner, scale, shift = self._built[key]
        raw = ((x - shift) / scale).astype(np.float32)  # the pixels the graph turns into x
        out = {k: np.asarray(v) for k, v in runner(raw, training=False).items()}
        return out if endpoints else out["logits" if self.num_classes else "pooled_features"]
