"""Writing converted weights and their model card: atomically, never overwriting by surprise.

Weights go to `X.pth` (torch.save) or `X.safetensors` (the model card, as strings, is its
metadata); the card also sits beside them as `X.json`.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from effconv.errors import UsageError

TORCH_SUFFIXES = (".pth", ".pt")
SAFETENSORS_SUFFIX = ".safetensors"
WEIGHT_SUFFIXES = (*TORCH_SUFFIXES, SAFETENSORS_SUFFIX)


def card_path(weights_path: str | os.PathLike) -> Path:
    """The model card sits beside the weights: X.pth -> X.json."""
    return Path(weights_path).with_suffix(".json")


def check_output(out: str | os.PathLike, force: bool) -> tuple[Path, Path]:
    """Validate the output location before any work is done."""
    out = Path(out)
    if out.suffix not in WEIGHT_SUFFIXES:
        raise UsageError(f"--out must end in {', '.join(WEIGHT_SUFFIXES)}: {out}")
    card = card_path(out)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise UsageError(f"output directory {what}: {parent}")
    try:  # os.access says yes to root even where nothing can be created (a read-only mount, /proc)
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise UsageError(f"output directory is not writable: {parent} ({e.strerror or e})") from None
    for path in (out, card):
        if path.is_dir():
            raise UsageError(f"output path is a directory: {path}")
        if path.exists() and not force:
            raise UsageError(f"output exists: {path} (use --force to overwrite)")
    return out, card


def _temporary_beside(path: Path, write: Callable[[Path], None]) -> Path:
    """Write through a hidden temporary file in the same folder, synced to disk."""
    # The writer's pid in the name lets a later run remove what a killed one left behind.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
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


def _remove_stale_temporaries(path: Path) -> None:
    """Delete the `.X.<pid>.*.tmp` files beside `path` whose writer is dead (killed, power lost)."""
    if os.name != "posix":  # os.kill(pid, 0) probes a process only on POSIX
        return
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2 :].split(".", 1)[0]
        if not (pid.isascii() and pid.isdigit() and 0 < int(pid) < 2**31):
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                tmp.unlink()
        except OSError:  # alive, but another user's
            pass


def card_to_metadata(card: dict) -> dict[str, str]:
    """safetensors metadata holds strings only: strings as they are, everything else as JSON."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in card.items()}


def card_from_metadata(metadata: dict[str, str]) -> dict:
    """The inverse of `card_to_metadata` (the card's own strings are never valid JSON)."""
    card = {}
    for k, v in metadata.items():
        try:
            card[k] = json.loads(v)
        except ValueError:
            card[k] = v
    return card


def _saver(state_dict: dict[str, torch.Tensor], card: dict, out: Path) -> Callable[[Path], None]:
    if out.suffix == SAFETENSORS_SUFFIX:
        from safetensors.torch import save_file

        metadata = card_to_metadata(card)
        return lambda p: save_file(state_dict, str(p), metadata=metadata)
    from effconv.mappings.layouts import get_layout

    key = get_layout(card.get("layout", "native")).checkpoint_key
    payload = {key: state_dict, "meta": card} if key else state_dict
    return lambda p: torch.save(payload, p)


def write_artifact(state_dict: dict[str, torch.Tensor], card: dict, out: str | os.PathLike, force: bool = False):
    """Save `state_dict` to `out` (.pth/.pt or .safetensors) and `card` beside it; returns (weights, card) paths.

    Both files are complete on disk before either is renamed into place, so an
    interrupted run leaves the old outputs (or none) and never a half-written one.
    A layout with a `checkpoint_key` (mmpretrain) makes a .pth hold `{key: state_dict, "meta": card}`.
    """
    out, card_file = check_output(out, force)
    for path in (out, card_file):
        _remove_stale_temporaries(path)
    card = {**card, "file_format": "safetensors" if out.suffix == SAFETENSORS_SUFFIX else "torch"}
    temps: list[Path] = []
    try:
        temps.append(_temporary_beside(out, _saver(state_dict, card, out)))
        text = json.dumps(card, indent=2) + "\n"
        temps.append(_temporary_beside(card_file, lambda p: p.write_text(text)))
        os.replace(temps[0], out)
        os.replace(temps[1], card_file)
    except OSError as e:
        raise UsageError(f"cannot write {out}: {e.strerror or e}") from e
    except Exception as e:  # torch.save and safetensors report a failed write (a full disk) in types of their own
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot write {out} (is the disk full?): {reason}") from e
    finally:
        for tmp in temps:
            with contextlib.suppress(OSError):
                tmp.unlink()
    return out, card_file


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of an artifact, .pth or .safetensors, without executing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"weights file not found: {path}")
    try:
        if path.suffix == SAFETENSORS_SUFFIX:
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # both libraries raise many types for a file that is not what it claims
        raise UsageError(f"cannot load {path} as a state dict: {str(e).splitlines()[0]}") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict) and "meta" in state:
        state = state["state_dict"]  # mmpretrain's wrapping
    if not isinstance(state, dict):
        raise UsageError(f"{path} does not hold a state dict")
    return state


def read_card(weights_path: str | os.PathLike, expect_layout: str | None = "native") -> dict:
    """The model card beside `weights_path`; with `expect_layout`, refuse a card of another layout.

    effconv's own loader builds the native model only: a timm or mmpretrain artifact
    is refused with a message naming the library that loads it.
    """
    path = card_path(weights_path)
    if not path.is_file():
        raise UsageError(f"model card not found: {path} (it is written beside the weights by effconv convert)")
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"model card {path} is not readable JSON: {e}") from e
    if not isinstance(card, dict):
        raise UsageError(f"model card {path} is not a JSON object")
    layout = card.get("layout", "native")
    if not isinstance(layout, str):
        raise UsageError(f"model card {path} has no valid 'layout' (got {layout!r})")
    if expect_layout is not None and layout != expect_layout:
        from effconv.mappings.layouts import LAYOUTS

        library = LAYOUTS[layout].library if layout in LAYOUTS else "the library it was written for"
        section = card.get(layout) if isinstance(card.get(layout), dict) else {}
        hint = section.get("create") or (f"config {section['config']}" if "config" in section else None)
        raise UsageError(
            f"{weights_path} holds the {layout} layout: load it with {library}"
            + (f" ({hint})" if hint else "")
            + f"; effconv loads {expect_layout} artifacts (effconv convert --layout {expect_layout})"
        )
    return card
