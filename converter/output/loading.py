"""Rebuild a converted model from its weights file (.pth or .safetensors) and model card.

Every layout effconv writes loads here: a timm or mmpretrain file's names are mapped back to the
native model's through the layout tables (`effconv.mappings`), so the file a user ships is the file
effconv checks and runs. Here rather than in `effconv.models`, which imports nothing of the converter: reading an
artifact needs `effconv.output.artifact`. `effconv.models.load` re-exports `load` lazily.
"""

from __future__ import annotations

import os

import torch

from effconv.errors import EffconvError, UsageError, one_line
from effconv.models.efficientnet import EfficientNet, create_model
from effconv.output.artifact import read_card, read_weights


def _check_classes(state: dict, arch: str, num_classes: int, path: str | os.PathLike) -> None:
    """Before the model is built: a class count the weights do not hold could size a huge classifier."""
    weight = state.get("classifier.weight")
    rows = int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() > 0 else 0
    if rows != num_classes:
        held = "it has no classifier.weight" if weight is None else f"its classifier.weight has {rows} rows"
        raise UsageError(f"{path} does not fit the {arch} model with {num_classes} classes its card describes: {held}")


def _native_state(state: dict, card) -> dict:
    """`state` under the native model's names, its floating tensors in float32.

    A layout's names are mapped back through its table (the inverse of `engine.layout_names`);
    a name the table does not give is kept, for `load_state_dict` to report. Half-precision
    weights are upcast: the model computes in float32 whatever dtype the file holds.
    """
    from effconv.mappings import engine
    from effconv.mappings.layouts import get_layout

    if card.layout != "native":
        try:
            names = engine.layout_names(get_layout(card.layout), card.arch, card.num_classes)
        except EffconvError as e:  # an unknown layout, or one that cannot express the arch
            raise UsageError(f"{card.where}: {one_line(e)}") from None
        back = {renamed: native for native, renamed in names.items()}
        state = {back.get(k, k): v for k, v in state.items()}
    return {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in state.items()}


def load(path: str | os.PathLike, channels_last: bool = True) -> EfficientNet:
    """The eval-mode, float32 EfficientNet that `effconv convert` wrote to `path`, in any layout and dtype.

    `path`: a .pth/.pt or .safetensors of the native, timm or mmpretrain layout (an mmpretrain .pth
    wraps its state dict as `{"state_dict": ..., "meta": card}`), with its model card `X.json` beside it;
    the card's layout says how the names map back to effconv's model. Weights stored as float16 or
    bfloat16 are upcast to float32: the model always computes in float32 (the card's `dtype` still
    says what the file holds). Weights are read without executing pickled code (`weights_only=True`,
    or safetensors). `channels_last`: as in `create_model` (faster on CPU; `state_dict()` values are
    unchanged). The model card is `model.card`, an `effconv.card.ModelCard` (typed fields; read by key,
    a dict's values).
    """
    card = read_card(path, expect_layout=None)  # checked: a card is editable JSON
    state = _native_state(read_weights(path), card)
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
