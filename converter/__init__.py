"""effconv: official TensorFlow EfficientNet checkpoints to exact PyTorch models."""

from __future__ import annotations

__version__ = "0.1.0"


_LAZY = {
    "get_model": "effconv.zoo.model_zoo",
    "inference_model": "effconv.zoo.inference",
}


def __getattr__(name: str):
    # Lazy, so that `import effconv` (and the CLI's start) does not import torch.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'effconv' has no attribute {name!r}")
