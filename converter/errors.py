"""The one exception family. The CLI turns each into a one-line message and an exit code."""

from __future__ import annotations

import re


class EffconvError(Exception):
    """Base of every error effconv raises on purpose; `exit_code` is what the CLI returns."""

    exit_code = 2


class UsageError(EffconvError):
    """Bad arguments: unknown arch, contradicting options, output exists, ..."""


class CheckpointError(EffconvError):
    """The source is missing, not a checkpoint, truncated or corrupted."""


class MappingError(EffconvError):
    """The checkpoint's variables do not fit the architecture."""


class OutputError(EffconvError):
    """The output could not be written: a full disk, a folder without write permission, a failing writer.

    Not the user's mistake, but not a bug either; exit code 2 as for every bad input, as documented.
    """


class ParityError(EffconvError):
    """TensorFlow and PyTorch disagree beyond tolerance."""

    exit_code = 1


_BULLET = re.compile(r"^[-*•]\s+")  # "- method gz: ..." (tarfile's list of the reasons of a failure)


def one_line(error: BaseException | str, *, max_lines: int | None = None, typed: bool = False) -> str:
    """`error`'s message on one line, as the CLI prints every error.

    Blank lines go; each line is stripped of indents and list bullets. A first line
    ending in ':' introduces the others: "head (line; line)". Otherwise the lines are
    joined with '; '. `max_lines` (>= 1) keeps only the first lines, then '...': for
    libraries that put a summary first and pages of advice or logs after it (torch.load,
    the ONNX exporter). `typed` puts the exception's type first (h5py's messages assume
    it is shown). An exception without a message is named by its type.
    """
    lines = [_BULLET.sub("", line.strip()) for line in str(error).splitlines()]
    lines = [line for line in lines if line]
    kept = lines[: max(1, max_lines)] if max_lines is not None else lines
    if len(kept) < len(lines):
        kept[-1] += " ..."
    head, *rest = kept or [""]
    if rest and head.endswith(":"):
        text = f"{head[:-1].rstrip()} ({'; '.join(rest)})"
    else:
        text = "; ".join(kept)
    if isinstance(error, BaseException):
        name = type(error).__name__
        return f"{name}: {text}" if text and typed else text or name
    return text
