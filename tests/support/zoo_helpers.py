"""Helpers for the model-zoo tests (inference, evaluation): a converted b0 and a few real photographs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from effconv.convert import convert_checkpoint
from effconv.output.artifact import write_artifact


def convert_to(fixture_ckpt: Path, out: Path, variant: str = "standard") -> Path:
    """The official-format b0 fixture (random weights, 1000 classes) converted to `out` with its card."""
    result = convert_checkpoint(fixture_ckpt, variant=variant)
    write_artifact(result.state_dict, result.card, out)
    return out


def photographs() -> dict[str, np.ndarray]:
    """scikit-image's sample photographs (RGB uint8), of assorted sizes."""
    from skimage import data

    return {"chelsea": data.chelsea(), "coffee": data.coffee(), "rocket": data.rocket(), "astronaut": data.astronaut()}


def write_photos(folder: Path, suffix: str = ".jpg") -> list[Path]:
    """The photographs saved under `folder` as JPEG (quality 90) or PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, pixels in photographs().items():
        paths.append(folder / f"{name}{suffix}")
        Image.fromarray(pixels).save(paths[-1], **({"quality": 90} if suffix == ".jpg" else {}))
    return paths


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Small batches run faster on one thread, and far faster than on two of a busy two-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
