"""effconv: official TensorFlow EfficientNet checkpoints to exact PyTorch models."""

from __future__ import annotations

__version__ = "0.1.0"
