"""EfficientNet architecture table and PyTorch model; the TF reference is imported on its own."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from effconv.models.efficientnet import EfficientNet, create_model
    from effconv.output.loading import load

__all__ = ["EfficientNet", "create_model", "load"]


def __getattr__(name: str):
    # Lazy, so that `effconv.models.spec` stays importable without torch.
    if name in ("EfficientNet", "create_model"):
        from effconv.models import efficientnet

        return getattr(efficientnet, name)
    if name == "load":
        # The one name taken from the converter: `load` reads artifacts (effconv.output), which models/
        # does not import; it lives in effconv.output.loading and is re-exported here, lazily, for the API.
        from effconv.output.loading import load

        return load
    raise AttributeError(name)
