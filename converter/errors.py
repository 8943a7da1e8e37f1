"""The one exception family. The CLI turns each into a one-line message and an exit code."""

from __future__ import annotations


class EffconvError(Exception):
    """Base of every error effconv raises on purpose; `exit_code` is what the CLI returns."""

    exit_code = 2


class UsageError(EffconvError):
    """Bad arguments: unknown arch, contradicting options, output exists, ..."""


class CheckpointError(EffconvError):
    """The source is missing, not a checkpoint, truncated or corrupted."""


class MappingError(EffconvError):
    """The checkpoint's variables do not fit the architecture."""


class ParityError(EffconvError):
    """TensorFlow and PyTorch disagree beyond tolerance."""

    exit_code = 1
