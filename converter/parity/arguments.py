"""`effconv verify`'s arguments, checked before anything heavy starts (TensorFlow, a conversion).

A mistake in the last argument must not cost the minute that importing TensorFlow and running two models
takes: the report paths, the image folder (every image decoded once) and the weights' arch against the
checkpoint's are all checked first. This module imports neither torch nor TensorFlow.
"""

from __future__ import annotations

import os
from pathlib import Path

from effconv.errors import UsageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The images of `--images`, sorted, each one decoded once here: a file that is no image is named now."""
    from effconv.zoo.preprocess import decode_image

    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"--images: not a directory: {folder}")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise UsageError(f"--images: no {'/'.join(IMAGE_SUFFIXES)} files in {folder}")
    for path in paths:
        decode_image(path)  # UsageError naming the file
    return paths


def check_weights_fit_source(src: str | os.PathLike, weights: str | os.PathLike) -> None:
    """The converted file's card must name the checkpoint's arch.

    Read from the card and the checkpoint's names and shapes only (no tensor data, no TensorFlow). Other
    disagreements (classes, a card that does not fit its own weights) are found where the weights are read.
    """
    from effconv.formats import open_source
    from effconv.output.artifact import read_card

    card = read_card(weights)
    with open_source(src) as source:
        shapes = {name: tuple(source.reader.info(name).shape) for name in source.reader.keys()}
        held = source.format.detect(shapes)
    if held.arch != card.arch:
        raise UsageError(
            f"--weights {weights} holds efficientnet-{card.arch} weights (its card), but the checkpoint {src} "
            f"is efficientnet-{held.arch}: verify checks a file against the checkpoint it was converted from"
        )
