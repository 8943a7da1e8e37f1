"""Rebuild a converted model from its weights file (.pth or .safetensors) and model card."""

from __future__ import annotations

import os

import torch

from effconv.errors import UsageError
from effconv.models import spec
from effconv.models.efficientnet import EfficientNet, create_model
from effconv.output.artifact import card_path, read_card, read_weights


def card_model(card: dict, path: str | os.PathLike) -> tuple[str, int]:
    """The arch and class count that the card of `path` describes, checked: a card is editable JSON."""
    where = f"the model card {card_path(path)}"
    arch, num_classes = card.get("arch"), card.get("num_classes")
    if not isinstance(arch, str):
        raise UsageError(f"{where} has no valid 'arch' (got {arch!r}); expected one of {', '.join(spec.ARCH_NAMES)}")
    try:
        spec.get_arch(arch)
    except UsageError as e:
        raise UsageError(f"{where}: {e}") from None
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise UsageError(f"{where} has no valid 'num_classes' (got {num_classes!r}); expected an integer >= 0")
    return arch, num_classes


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
    """
    card = read_card(path, expect_layout="native")
    arch, num_classes = card_model(card, path)
    state = read_weights(path)
    _check_classes(state, arch, num_classes, path)
    model = create_model(arch, num_classes, channels_last=channels_last)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise UsageError(
            f"{path} does not fit the {arch} model with {num_classes} classes its card describes: "
            f"{' '.join(first[1:3]) or first[0]}"
        ) from e
    model.card = card
    return model
