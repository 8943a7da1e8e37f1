"""Rebuild a converted model from its weights file (.pth or .safetensors) and model card."""

from __future__ import annotations

import os

from effconv.artifact import read_card, read_weights
from effconv.errors import UsageError
from effconv.models.efficientnet import EfficientNet


def load(path: str | os.PathLike) -> EfficientNet:
    """The eval-mode, float32 EfficientNet that `effconv convert --layout native` wrote to `path`.

    Weights are read without executing pickled code (`weights_only=True`, or safetensors).
    """
    card = read_card(path, expect_layout="native")
    model = EfficientNet(card["arch"], int(card["num_classes"]))
    state = read_weights(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise UsageError(
            f"{path} does not fit the {card['arch']} model with {card['num_classes']} classes its card "
            f"describes: {' '.join(first[1:3]) or first[0]}"
        ) from e
    model.card = card
    return model.eval()
