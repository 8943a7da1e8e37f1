"""Rebuild a converted model from its weights file and model card."""

from __future__ import annotations

import os

import torch

from effconv.artifact import read_card
from effconv.errors import UsageError
from effconv.models.efficientnet import EfficientNet


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load weights without executing pickled code (weights_only)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise UsageError(f"weights file not found: {path}") from e
    except Exception as e:  # torch raises many types for a file that is not a safe state dict
        raise UsageError(f"cannot load {path} as a plain state dict: {str(e).splitlines()[0]}") from e
    if not isinstance(state, dict):
        raise UsageError(f"{path} does not hold a state dict")
    return state


def load(path: str | os.PathLike) -> EfficientNet:
    """The eval-mode EfficientNet that `effconv convert` wrote to `path`."""
    card = read_card(path)
    model = EfficientNet(card["arch"], int(card["num_classes"]))
    state = load_state_dict(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UsageError(f"{path} does not fit the {card['arch']} model its card describes: {e}") from e
    model.card = card
    return model.eval()
