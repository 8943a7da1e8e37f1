"""Writing converted weights and their model card: atomically, never overwriting by surprise.

Weights go to `X.pth` (torch.save) or `X.safetensors` (the model card, as strings, is its
metadata); the card also sits beside them as `X.json`.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import pickle
import shutil
import struct
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError

from effconv.card import ModelCard
from effconv.errors import OutputError, UsageError, one_line
from effconv.output.writing import output_error

# What torch.load(weights_only=True) and safetensors raise for a file that is not what it claims
# (each was seen on mutated and truncated files: tests/robustness/test_untrusted_weights.py).
_LOAD_ERRORS = (
    pickle.UnpicklingError,  # weights_only refused the pickle, or it is no pickle
    OSError,
    EOFError,
    RuntimeError,  # not a zip archive, a record of the wrong size
    ValueError,  # UnicodeDecodeError among them
    LookupError,
    TypeError,
    AttributeError,
    AssertionError,  # the legacy format: a storage key that is not in the file
    struct.error,
    SafetensorError,
)
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
        raise OutputError(f"output directory is not writable: {parent} ({e.strerror or e})") from None
    for path in (out, card):
        if path.is_dir():
            raise UsageError(f"output path is a directory: {path}")
        if path.exists() and not force:
            raise UsageError(f"output exists: {path} (use --force to overwrite)")
    return out, card


def _new_temporary(path: Path) -> Path:
    """A hidden, empty temporary file beside `path` (same folder: the final rename is atomic)."""
    # The writer's pid in the name lets a later run remove what a killed one left behind.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp_name)


def _seal(tmp: Path) -> None:
    """Flush a finished temporary to disk and give it the usual permissions."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)


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
                shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()  # a folder layout's temporary is a folder
        except OSError:  # alive, but another user's
            pass


# Hard links are missing on some filesystems (FAT, some FUSE and SMB mounts): there the name is claimed by an
# exclusive create, then replaced.
_NO_HARD_LINKS = {errno.EPERM, errno.EMLINK, errno.ENOSYS, errno.EOPNOTSUPP}


def _claim(tmp: Path, final: Path) -> None:
    """Move `tmp` to `final` only if no file has that name, in one step.

    Of two runs racing for one output, the second fails with "output exists" instead of replacing the
    first's: `check_output`'s earlier look cannot see a run that has not committed yet.
    """
    exists = UsageError(f"output exists: {final} (use --force to overwrite)")
    try:
        os.link(tmp, final)  # fails if `final` exists, atomically
    except FileExistsError:
        raise exists from None
    except OSError as e:
        if e.errno not in _NO_HARD_LINKS:
            raise
        try:
            os.close(os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            raise exists from None
        try:
            os.replace(tmp, final)
        except BaseException:
            final.unlink(missing_ok=True)  # the empty placeholder is ours
            raise
        return
    tmp.unlink()


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


class ArtifactWriter:
    """Weights written to a hidden temporary beside `out` as they come; `commit` renames them into place.

        with ArtifactWriter("b0.pth", force=False) as art:
            for name, tensor in tensors:
                art.add(name, tensor)  # written now (.pth); the caller may reuse the memory
            art.commit(card, order)  # pickle + zip directory, card beside, both renamed into place

    A .pth/.pt is streamed (`StreamingStateDictWriter`): the state dict is never whole in
    memory. A .safetensors needs every tensor before its header, so those are kept until
    `commit`. Leaving the block without `commit` (an error, Ctrl-C) removes the temporaries
    and leaves the old outputs, or none, untouched; a killed process leaves a temporary that
    the next run beside it removes.
    """

    def __init__(self, out: str | os.PathLike, force: bool = False):
        self.out, self.card_file = check_output(out, force)
        for path in (self.out, self.card_file):
            _remove_stale_temporaries(path)
        self.safetensors = self.out.suffix == SAFETENSORS_SUFFIX
        self.force = force
        self._temps: list[Path] = []
        self._placed: list[Path] = []  # final names this writer claimed, removed again if the commit fails
        self._kept: dict[str, torch.Tensor] = {}
        self._writer = None
        self._done = False
        with self._write_errors():
            self._temps.append(_new_temporary(self.out))
            if not self.safetensors:
                from effconv.output.streaming_save import StreamingStateDictWriter

                self._writer = StreamingStateDictWriter(self._temps[0])

    def add(self, name: str, tensor: torch.Tensor, owned: bool = False) -> None:
        """Write (or, for safetensors, keep) one tensor; `owned`: the caller will not reuse its memory."""
        if self._done:
            raise UsageError(f"cannot add {name!r}: the artifact {self.out} is already committed or discarded")
        if self._writer is None:
            if name in self._kept:
                raise UsageError(f"tensor {name!r} written twice")
            # contiguous, as save_file requires (a .pth is streamed contiguous whatever the strides)
            self._kept[name] = tensor.contiguous() if owned else tensor.clone(memory_format=torch.contiguous_format)
            return
        with self._write_errors():
            self._writer.add(name, tensor)

    def commit(self, card: dict | ModelCard, order: list[str] | None = None) -> tuple[Path, Path]:
        """Finish the weights (names in `order`, default as added) and the card; rename both into place."""
        if self._done:
            raise UsageError(f"the artifact {self.out} is already committed or discarded")
        card = {**card, "file_format": "safetensors" if self.safetensors else "torch"}
        with self._write_errors():
            if self._writer is None:
                from safetensors.torch import save_file

                names = list(self._kept) if order is None else order
                save_file({k: self._kept[k] for k in names}, str(self._temps[0]), metadata=card_to_metadata(card))
                self._kept.clear()
            else:
                from effconv.mappings.layouts import get_layout

                key = get_layout(card.get("layout", "native")).checkpoint_key
                self._writer.close(order, wrap_key=key, meta=card if key else None)
            _seal(self._temps[0])
            self._temps.append(_new_temporary(self.card_file))
            self._temps[1].write_text(json.dumps(card, indent=2) + "\n")
            _seal(self._temps[1])
            self._place(self._temps[0], self.out)
            self._place(self._temps[1], self.card_file)
            self._temps.clear()
            self._placed.clear()
        self._done = True
        return self.out, self.card_file

    def _place(self, tmp: Path, final: Path) -> None:
        """Rename a finished temporary into place; without force, only if `final` still does not exist."""
        if self.force:
            os.replace(tmp, final)
            return
        _claim(tmp, final)
        self._placed.append(final)

    def discard(self) -> None:
        """Abandon the artifact: temporaries (and names claimed by a commit that failed) removed, others untouched."""
        self._done = True
        self._kept.clear()
        if self._writer is not None:
            self._writer.abort()
        for path in (*self._temps, *self._placed):
            with contextlib.suppress(OSError):
                path.unlink()
        self._temps.clear()
        self._placed.clear()

    @contextlib.contextmanager
    def _write_errors(self):
        """Discard the artifact on any error; a failed write (a full disk) becomes one OutputError.

        Anything else (a card that is not JSON, a bug) is raised as it is: it is no disk problem.
        """
        try:
            yield
        except BaseException as e:
            self.discard()
            if (failure := output_error(e, self.out)) is None:
                raise
            raise failure from e

    def __enter__(self) -> ArtifactWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._done or self._temps:
            self.discard()


def write_artifact(
    state_dict: dict[str, torch.Tensor], card: dict | ModelCard, out: str | os.PathLike, force: bool = False
):
    """Save `state_dict` to `out` (.pth/.pt or .safetensors) and `card` beside it; returns (weights, card) paths.

    Both files are complete on disk before either is renamed into place, so an
    interrupted run leaves the old outputs (or none) and never a half-written one.
    A layout with a `checkpoint_key` (mmpretrain) makes a .pth hold `{key: state_dict, "meta": card}`.
    """
    with ArtifactWriter(out, force) as art:
        for name, tensor in state_dict.items():
            art.add(name, tensor, owned=True)
        return art.commit(card)


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
    except _LOAD_ERRORS as e:
        raise UsageError(f"cannot load {path} as a state dict: {one_line(e, max_lines=1)}") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict) and "meta" in state:
        state = state["state_dict"]  # mmpretrain's wrapping
    if not isinstance(state, dict):
        raise UsageError(f"{path} does not hold a state dict")
    return state


def read_card(weights_path: str | os.PathLike, expect_layout: str | None = None) -> ModelCard:
    """The model card beside `weights_path`, checked; with `expect_layout`, refuse a card of another layout.

    effconv itself loads every layout (`effconv.output.loading.load` maps the names back);
    `expect_layout` is for a caller that hands the file on to one library, and its refusal
    names the library that loads the file.
    """
    path = card_path(weights_path)
    if not path.is_file():
        raise UsageError(f"model card not found: {path} (it is written beside the weights by effconv convert)")
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"model card {path} is not readable JSON: {e}") from e
    card = ModelCard.from_json(obj, where=f"the model card {path}")
    if expect_layout is not None and card.layout != expect_layout:
        from effconv.mappings.layouts import LAYOUTS

        library = LAYOUTS[card.layout].library if card.layout in LAYOUTS else "the library it was written for"
        section = card.layout_section or {}
        hint = section.get("create") or (f"config {section['config']}" if "config" in section else None)
        raise UsageError(
            f"{weights_path} holds the {card.layout} layout, not {expect_layout}: load it with {library}"
            + (f" ({hint})" if hint else "")
            + f", or convert again with --layout {expect_layout}"
        )
    return card
