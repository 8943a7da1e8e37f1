"""Writing converted weights and their model card: atomically, never overwriting by surprise."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from effconv.errors import UsageError

WEIGHT_SUFFIXES = (".pth", ".pt")


def card_path(weights_path: str | os.PathLike) -> Path:
    """The model card sits beside the weights: X.pth -> X.json."""
    return Path(weights_path).with_suffix(".json")


def check_output(out: str | os.PathLike, force: bool) -> tuple[Path, Path]:
    """Validate the output location before any work is done."""
    out = Path(out)
    if out.suffix not in WEIGHT_SUFFIXES:
        raise UsageError(f"--out must end in {' or '.join(WEIGHT_SUFFIXES)}: {out}")
    card = card_path(out)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"output directory does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"output directory is not writable: {parent}")
    for path in (out, card):
        if path.is_dir():
            raise UsageError(f"output path is a directory: {path}")
        if path.exists() and not force:
            raise UsageError(f"output exists: {path} (use --force to overwrite)")
    return out, card


def _temporary_beside(path: Path, write: Callable[[Path], None]) -> Path:
    """Write through a hidden temporary file in the same folder, synced to disk."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return tmp


def write_artifact(state_dict: dict[str, torch.Tensor], card: dict, out: str | os.PathLike, force: bool = False):
    """Save `state_dict` to `out` and `card` beside it; returns (weights path, card path).

    Both files are complete on disk before either is renamed into place, so an
    interrupted run leaves the old outputs (or none) and never a half-written one.
    """
    out, card_file = check_output(out, force)
    temps: list[Path] = []
    try:
        temps.append(_temporary_beside(out, lambda p: torch.save(state_dict, p)))
        text = json.dumps(card, indent=2) + "\n"
        temps.append(_temporary_beside(card_file, lambda p: p.write_text(text)))
        os.replace(temps[0], out)
        os.replace(temps[1], card_file)
    except OSError as e:
        raise UsageError(f"cannot write {out}: {e.strerror or e}") from e
    finally:
        for tmp in temps:
            with contextlib.suppress(OSError):
                tmp.unlink()
    return out, card_file


def read_card(weights_path: str | os.PathLike) -> dict:
    path = card_path(weights_path)
    if not path.is_file():
        raise UsageError(f"model card not found: {path} (it is written beside the weights by effconv convert)")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"model card {path} is not readable JSON: {e}") from e
