"""Rebuild a converted model from its weights file (.pth or .safetensors) and model card.

Here rather than in `effconv.models`, which imports nothing of the converter: reading an
artifact needs `effconv.output.artifact`. `effconv.models.load` re-exports `load` lazily.
"""

from __future__ import annotations

import os

import torch

from effconv.errors import UsageError, one_line
from effconv.models.efficientnet import EfficientNet, create_model
from effconv.output.artifact import read_card, read_weights


def _check_classes(state: dict, arch: str, num_classes: int, path: str | os.PathLike) -> None:
    """Before the model is built: a class count the weights do not hold could size a huge classifier."""
    weight = state.get("classifier.weight")
    rows = int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() > 0 else 0
    if rows != num_classes:
        held = "it has no classifier.weight" if weight is None else f"its classifier.weight has {rows} rows"
        raise UsageError(f"{path} does not fit the {arch} model with {num_classes} classes its card describes: {held}")


def load(path: str | os.PathLike, channels_last: bool = True) -> EfficientNet:
    """The eval-mode, float32 EfficientNet that `effconv convert --layout native` wrote to `path`.

    Weights are read without executing pickled code (`weights_only=True`, or safetensors).
    `channels_last`: as in `create_model` (faster on CPU; `state_dict()` values are unchanged).
    The model card is `model.card`, an `effconv.card.ModelCard` (typed fields; read by key, a dict's values).
    """
    card = read_card(path, expect_layout="native")  # checked: a card is editable JSON
    state = read_weights(path)
    _check_classes(state, card.arch, card.num_classes, path)
    model = create_model(card.arch, card.num_classes, channels_last=channels_last)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # its first mismatches: torch lists every one, a line each
        raise UsageError(
            f"{path} does not fit the {card.arch} model with {card.num_classes} classes its card describes: "
            f"{one_line(e, max_lines=3)}"
        ) from e
    model.card = card
    return model
