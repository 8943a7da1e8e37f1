"""Writing a folder layout (`--layout hf --out DIR`): the same guarantees as `ArtifactWriter`, for a folder.

Everything is written into a hidden temporary folder beside `DIR` (`.DIR.<pid>.<random>.tmp`), synced,
and renamed into place at the end: an error or Ctrl-C leaves the old folder (or none), never a half
one; a folder left by a killed process is removed by the next run writing the same output. Without
--force an existing `DIR` is refused (a rename never replaces a folder that is not empty); with
--force the old folder is swapped out in one step where the system can (Linux's RENAME_EXCHANGE),
and only a folder effconv wrote (or an empty one) is ever replaced.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from effconv.card import ModelCard
from effconv.errors import OutputError, UsageError
from effconv.mappings.layouts import get_layout
from effconv.mappings.tables import FolderLayout
from effconv.output.artifact import (
    WEIGHT_SUFFIXES,
    ArtifactWriter,
    _remove_stale_temporaries,
    _seal,
    card_path,
)
from effconv.output.writing import output_error

_RENAME_EXCHANGE = 2  # linux/fs.h


def writer_for(out: str | os.PathLike, force: bool, layout: str = "native") -> ArtifactWriter | FolderWriter:
    """The writer of `layout`'s output: one weights file and its card, or a folder."""
    folder = get_layout(layout).folder
    return FolderWriter(out, folder, force, layout) if folder is not None else ArtifactWriter(out, force)


def _check_parent(out: Path) -> None:
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise UsageError(f"output directory {what}: {parent}")
    try:  # os.access says yes to root even where nothing can be created (a read-only mount, /proc)
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise OutputError(f"output directory is not writable: {parent} ({e.strerror or e})") from None


def _ours(folder: Path, layout: FolderLayout) -> bool:
    """Whether `folder` holds nothing but what this layout writes (so --force may replace it)."""
    names = {layout.weights, card_path(layout.weights).name, *layout.files}
    return all(entry.name in names and entry.is_file() for entry in folder.iterdir())


def check_folder_output(out: str | os.PathLike, layout: FolderLayout, force: bool, name: str) -> Path:
    """Validate a folder output before any work is done."""
    out = Path(out)
    if out.suffix in WEIGHT_SUFFIXES:
        raise UsageError(f"--layout {name} writes a folder: give --out a directory name, not a {out.suffix} file")
    _check_parent(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"output path is a file, --layout {name} writes a folder: {out}")
    if out.is_dir():
        if not force:
            raise UsageError(f"output exists: {out} (use --force to overwrite)")
        if not _ours(out, layout):
            raise UsageError(f"output folder holds other files: {out} (--force replaces only a folder effconv wrote)")
    return out


def _sync_folder(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2); False where the system or filesystem cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_cwd = -100
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


class FolderWriter:
    """`ArtifactWriter`'s interface for a folder layout: `add` keeps the tensors, `commit` writes and renames.

    `commit` returns (the folder, the model card in it).
    """

    def __init__(self, out: str | os.PathLike, layout: FolderLayout, force: bool = False, name: str = "hf"):
        self.out = check_folder_output(out, layout, force, name)
        self.layout, self.force = layout, force
        self.card_file = self.out / card_path(layout.weights).name
        _remove_stale_temporaries(self.out)
        self._kept: dict[str, torch.Tensor] = {}
        self._done = False
        self._tmp: Path | None = None
        with self._write_errors():
            # The writer's pid in the name lets a later run remove what a killed one left behind.
            self._tmp = Path(
                tempfile.mkdtemp(prefix=f".{self.out.name}.{os.getpid()}.", suffix=".tmp", dir=self.out.parent)
            )

    def add(self, name: str, tensor: torch.Tensor, owned: bool = False) -> None:
        """Keep one tensor (safetensors needs them all before its header); `owned`: the caller will not reuse it."""
        if self._done:
            raise UsageError(f"cannot add {name!r}: the artifact {self.out} is already committed or discarded")
        if name in self._kept:
            raise UsageError(f"tensor {name!r} written twice")
        self._kept[name] = tensor.contiguous() if owned else tensor.clone(memory_format=torch.contiguous_format)

    def commit(self, card: dict | ModelCard, order: list[str] | None = None) -> tuple[Path, Path]:
        """Write the weights, the library's files and the card into the temporary folder; rename it into place."""
        if self._done:
            raise UsageError(f"the artifact {self.out} is already committed or discarded")
        card = {**card, "file_format": "safetensors"}
        with self._write_errors():
            from safetensors.torch import save_file

            names = list(self._kept) if order is None else order
            weights = self._tmp / self.layout.weights
            save_file({k: self._kept[k] for k in names}, str(weights), metadata=dict(self.layout.metadata))
            self._kept.clear()
            files = {name: make(card) for name, make in self.layout.files.items()}
            files[self.card_file.name] = card
            for name, obj in files.items():
                (self._tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
            for path in (weights, *(self._tmp / name for name in files)):
                _seal(path)
            os.chmod(self._tmp, 0o755)
            _sync_folder(self._tmp)
            self._place()
            _sync_folder(self.out.parent)
        self._done = True
        return self.out, self.card_file

    def _place(self) -> None:
        """Rename the finished folder into place: a rename never replaces a folder that is not empty."""
        if self.force and self.out.is_dir():
            if not _ours(self.out, self.layout):  # it changed since the check
                raise UsageError(f"output folder holds other files: {self.out} (--force replaces only ours)")
            if _exchange(self._tmp, self.out):  # the old folder now sits at the temporary's name
                self._remove_temporary()
                return
            shutil.rmtree(self.out)
        try:
            os.rename(self._tmp, self.out)
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):  # another run got there first
                raise UsageError(f"output exists: {self.out} (use --force to overwrite)") from None
            raise
        self._tmp = None

    def _remove_temporary(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def discard(self) -> None:
        """Abandon the artifact: the temporary folder removed, an existing output untouched."""
        self._done = True
        self._kept.clear()
        self._remove_temporary()

    @contextlib.contextmanager
    def _write_errors(self):
        """Discard the artifact on any error; a failed write (a full disk) becomes one OutputError."""
        try:
            yield
        except BaseException as e:
            self.discard()
            if (failure := output_error(e, self.out)) is None:
                raise
            raise failure from e

    def __enter__(self) -> FolderWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._done or self._tmp is not None:
            self.discard()
