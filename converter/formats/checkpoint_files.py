"""Turn what the user passes into the files of one TF checkpoint.

Accepted: a directory (its `checkpoint` state file decides, else its only
`*.index`, else its only subdirectory holding one), a prefix (`.../model.ckpt`),
the prefix's `.index`, `.data-*` or `.meta` file, the `checkpoint` state file,
or a `.tar`/`.tar.gz`/`.tgz` as downloaded. From a tarball only the chosen
checkpoint's index and data shards are extracted, into a temporary directory
that lives as long as the `resolve_checkpoint` context.
"""

from __future__ import annotations

import contextlib
import os
import re
import tarfile
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from effconv.errors import CheckpointError, one_line
from effconv.output import writing

__all__ = ["MAX_EXTRACT_BYTES", "CheckpointFiles", "extract_checkpoint", "resolve_checkpoint"]

MAX_EXTRACT_BYTES = 16 * 2**30  # the largest official checkpoint (L2, EMA only) is about 2 GB
_STATE_FILE = "checkpoint"
_STATE_FILE_MAX_BYTES = 1 << 20
_MAX_TAR_MEMBERS = 100_000  # official tarballs hold a handful of files
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_DATA_RE = re.compile(r"(?P<stem>.+)\.data-(?P<shard>\d{5})-of-(?P<total>\d{5})")
_MODEL_PATH_RE = re.compile(r'^\s*model_checkpoint_path:\s*"((?:[^"\\]|\\.)*)"', re.MULTILINE)
_TAR_ERRORS: tuple[type[BaseException], ...] = (tarfile.TarError, EOFError, OSError, zlib.error)
try:
    import lzma

    _TAR_ERRORS += (lzma.LZMAError,)
except ImportError:  # pragma: no cover - Python built without lzma
    pass


@dataclass(frozen=True)
class CheckpointFiles:
    """One resolved checkpoint: open `prefix` with `TensorBundleReader`, hash `files`."""

    prefix: Path  # ".../model.ckpt"
    files: tuple[Path, ...]  # the index, then the data shards in order
    origin: Path  # what the user passed: directory, prefix, file or tarball


@contextlib.contextmanager
def resolve_checkpoint(src: str | os.PathLike, *, max_extract_bytes: int | None = None) -> Iterator[CheckpointFiles]:
    """Yield the checkpoint `src` designates; a tarball is extracted for the context's duration.

    `max_extract_bytes` caps what a tarball may extract to (default `MAX_EXTRACT_BYTES`).
    """
    origin = Path(src).expanduser()
    if _is_tarball(origin):
        with tempfile.TemporaryDirectory(prefix="effconv-") as tmp:
            limit = MAX_EXTRACT_BYTES if max_extract_bytes is None else max_extract_bytes
            prefix = _extract_checkpoint(origin, Path(tmp), limit)
            yield CheckpointFiles(prefix, _checkpoint_files(prefix), origin)
        return
    prefix = _find_prefix(origin)
    yield CheckpointFiles(prefix, _checkpoint_files(prefix), origin)


def local_checkpoint_files(src: str | os.PathLike) -> tuple[Path, ...]:
    """The index and data files of the unpacked checkpoint `src`; () for a tarball or anything unresolvable.

    Cheap and quiet: `resolve_checkpoint` gives the real answer, and the errors.
    """
    origin = Path(src).expanduser()
    try:
        if _is_tarball(origin):
            return ()
        return _checkpoint_files(_find_prefix(origin))
    except (CheckpointError, OSError, tarfile.TarError, ValueError):
        return ()


def extract_checkpoint(
    tar_path: str | os.PathLike, dest: str | os.PathLike, max_bytes: int = MAX_EXTRACT_BYTES
) -> Path:
    """Extract the one checkpoint in a tarball into the existing directory `dest`; returns its prefix there.

    Only the checkpoint's index and data shards are written, flat, each to a new file: no member may be a link,
    leave the archive's tree, or push the total past `max_bytes`.
    """
    return _extract_checkpoint(Path(tar_path), Path(dest), max_bytes)


# --- local files -----------------------------------------------------------------


def _index_path(prefix: Path) -> Path:
    return prefix.with_name(prefix.name + ".index")


def _is_tarball(path: Path) -> bool:
    if not path.is_file():
        return False
    if path.name.lower().endswith(_TAR_SUFFIXES):
        return True
    return _prefix_of_file_name(path) is None and path.name != _STATE_FILE and tarfile.is_tarfile(path)


def _prefix_of_file_name(path: Path) -> Path | None:
    """The prefix a checkpoint file belongs to, judged by its name alone."""
    name = path.name
    for suffix in (".index", ".meta"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return path.with_name(name[: -len(suffix)])
    match = _DATA_RE.fullmatch(name)
    return path.with_name(match["stem"]) if match else None


def _find_prefix(path: Path) -> Path:
    if path.is_dir():
        return _prefix_in_directory(path)
    if path.is_file():
        if path.name == _STATE_FILE:
            return _prefix_from_state_file(path)
        prefix = _prefix_of_file_name(path)
        if prefix is None:
            raise CheckpointError(
                f"{path} is not a TensorFlow checkpoint: pass a directory, a prefix such as "
                "model.ckpt, its .index or .data-* file, or a .tar/.tar.gz"
            )
        if not _index_path(prefix).is_file():
            raise CheckpointError(f"checkpoint index {_index_path(prefix)} not found (for {path})")
        return prefix
    if _index_path(path).is_file():
        return path
    raise CheckpointError(f"no such checkpoint: {path} (neither it nor {_index_path(path).name} exists)")


def _prefix_in_directory(directory: Path) -> Path:
    state_file = directory / _STATE_FILE
    if state_file.is_file():
        return _prefix_from_state_file(state_file)
    indexes = sorted(directory.glob("*.index"))
    if len(indexes) == 1:
        return indexes[0].with_name(indexes[0].name[: -len(".index")])
    if indexes:
        raise CheckpointError(
            f"{directory} holds several checkpoints and no '{_STATE_FILE}' file to choose one: "
            f"{', '.join(p.name for p in indexes)}; pass a prefix"
        )
    entries = sorted(directory.iterdir())
    if not entries:
        raise CheckpointError(f"directory {directory} is empty, expected a TensorFlow checkpoint")
    # A tarball extracted by hand: the checkpoint sits one directory down.
    subdirs = [p for p in entries if p.is_dir() and ((p / _STATE_FILE).is_file() or any(p.glob("*.index")))]
    if len(subdirs) == 1:
        return _prefix_in_directory(subdirs[0])
    if subdirs:
        raise CheckpointError(
            f"{directory} holds several checkpoint directories: {', '.join(p.name for p in subdirs)}; pass one"
        )
    raise CheckpointError(f"no TensorFlow checkpoint in {directory} (no '{_STATE_FILE}' file, no *.index)")


def _model_checkpoint_path(text: str, where: object) -> str:
    match = _MODEL_PATH_RE.search(text)
    if match is None:
        raise CheckpointError(f"{where} has no model_checkpoint_path")
    return re.sub(r"\\(.)", r"\1", match[1])


def _prefix_from_state_file(state_file: Path) -> Path:
    with open(state_file, encoding="utf-8", errors="replace") as f:
        recorded = _model_checkpoint_path(f.read(_STATE_FILE_MAX_BYTES), state_file)
    # Trainers often record absolute (even gs://) paths; the files then sit next to the state file.
    candidates = [state_file.parent / recorded, state_file.parent / PurePosixPath(recorded).name]
    for prefix in candidates:
        if _index_path(prefix).is_file():
            return prefix
    raise CheckpointError(
        f"{state_file} names checkpoint {recorded!r}, but {_index_path(candidates[-1])} does not exist"
    )


def _data_shard_names(stem: str, names: Iterable[str], where: object) -> list[str]:
    """The complete set of `<stem>.data-*-of-N` names among `names`, in shard order."""
    totals = {m["total"] for name in names if (m := _DATA_RE.fullmatch(name)) and m["stem"] == stem}
    if not totals:
        raise CheckpointError(f"no data file {stem}.data-00000-of-* in {where}")
    if len(totals) > 1:
        raise CheckpointError(f"{where} mixes data files of {stem} with different shard counts {sorted(totals)}")
    total = int(totals.pop())
    expected = [f"{stem}.data-{i:05d}-of-{total:05d}" for i in range(total)]
    missing = sorted(set(expected) - set(names))
    if missing:
        raise CheckpointError(f"missing data shard {missing[0]} in {where} ({len(missing)} of {total} missing)")
    return expected


def _checkpoint_files(prefix: Path) -> tuple[Path, ...]:
    parent = prefix.parent
    names = [p.name for p in parent.iterdir() if p.name.startswith(prefix.name + ".data-")]
    data = _data_shard_names(prefix.name, names, parent)
    return (_index_path(prefix), *(parent / name for name in data))


# --- tarballs ------------------------------------------------------------------------


def _extract_checkpoint(tar_path: Path, dest: Path, max_bytes: int) -> Path:
    """Extract the one checkpoint inside `tar_path` into `dest`; returns its prefix there."""
    try:
        with tarfile.open(tar_path, mode="r:*") as tar:
            members = _list_members(tar, tar_path, max_bytes)
            prefix = _choose_tar_prefix(tar, members, tar_path)
            chosen = _tar_checkpoint_members(members, prefix, tar_path)
            _check_safe(chosen, tar_path, max_bytes)
            for member in chosen:
                _extract_regular(tar, member, dest / PurePosixPath(member.name).name, tar_path)
    except _TAR_ERRORS as e:
        raise CheckpointError(f"cannot extract a checkpoint from {tar_path}: {one_line(e)}") from None
    return dest / prefix.name


def _list_members(tar: tarfile.TarFile, tar_path: Path, max_bytes: int) -> list[tarfile.TarInfo]:
    """Every member, refusing more than any checkpoint tarball holds.

    Empty headers compress a thousandfold: a small tarball could otherwise become millions of TarInfo objects.
    Each header is judged as it is read, before the data behind it: a compressed tarball must be decompressed to
    reach the next header, and a bomb's members declare tens of GiB of zeros in a few MB, so the sizes declared
    so far are held to the limit here, not once the whole archive has been read through.
    """
    members, declared = [], 0
    for member in tar:
        members.append(member)
        if len(members) > _MAX_TAR_MEMBERS:
            raise CheckpointError(f"{tar_path} holds more than {_MAX_TAR_MEMBERS} members; not a checkpoint tarball")
        declared += member.size
        if declared > max_bytes:
            raise CheckpointError(
                f"{tar_path} would extract to {declared} bytes or more (the sizes its members declare, up to "
                f"{member.name!r}), over the {max_bytes}-byte limit; refused before reading further"
            )
    return members


def _choose_tar_prefix(tar: tarfile.TarFile, members: list[tarfile.TarInfo], tar_path: Path) -> PurePosixPath:
    prefixes = sorted({PurePosixPath(m.name[: -len(".index")]) for m in members if m.name.endswith(".index")})
    if len(prefixes) == 1:
        return prefixes[0]
    if not prefixes:
        raise CheckpointError(f"no TensorFlow checkpoint (*.index) inside {tar_path}")
    named = set()
    for m in members:
        path = PurePosixPath(m.name)
        if path.name == _STATE_FILE and m.isreg() and m.size <= _STATE_FILE_MAX_BYTES:
            text = tar.extractfile(m).read().decode("utf-8", "replace")
            recorded = _model_checkpoint_path(text, f"{m.name} in {tar_path}")
            named.add(path.parent / PurePosixPath(recorded).name)
    named &= set(prefixes)
    if len(named) == 1:
        return named.pop()
    raise CheckpointError(
        f"{tar_path} holds several checkpoints: {', '.join(str(p) for p in prefixes)}; extract it and pass one"
    )


def _tar_checkpoint_members(
    members: list[tarfile.TarInfo], prefix: PurePosixPath, tar_path: Path
) -> list[tarfile.TarInfo]:
    """The index and data members of `prefix`, each of which must appear once."""
    index_name = prefix.name + ".index"
    by_name: dict[str, tarfile.TarInfo] = {}
    for m in members:
        path = PurePosixPath(m.name)
        match = _DATA_RE.fullmatch(path.name)
        if path.parent == prefix.parent and (path.name == index_name or (match and match["stem"] == prefix.name)):
            if path.name in by_name:
                raise CheckpointError(f"{m.name} appears twice in {tar_path}")
            by_name[path.name] = m
    data = _data_shard_names(prefix.name, list(by_name), tar_path)
    return [by_name[index_name], *(by_name[name] for name in data)]


def _check_safe(members: list[tarfile.TarInfo], tar_path: Path, max_bytes: int) -> None:
    for m in members:
        path = PurePosixPath(m.name)
        if path.is_absolute() or ".." in path.parts or "\\" in m.name:
            raise CheckpointError(f"unsafe path {m.name!r} in {tar_path}")
        if not m.isreg():
            kind = "a symlink" if m.issym() else "a hard link" if m.islnk() else "not a regular file"
            raise CheckpointError(f"{m.name} in {tar_path} is {kind}; refusing to extract it")
    total = sum(m.size for m in members)
    if total > max_bytes:
        raise CheckpointError(
            f"checkpoint in {tar_path} would extract to {total} bytes, over the {max_bytes}-byte limit"
        )


def _extract_regular(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path, tar_path: Path) -> None:
    source = tar.extractfile(member)
    if source is None:  # not reachable after _check_safe, kept for the type checker
        raise CheckpointError(f"{member.name} in {tar_path} is not a regular file")
    written = 0
    with source, writing.create(target) as out:
        while chunk := source.read(1 << 20):  # a read that fails is the tarball's: CheckpointError, above
            writing.write_all(out, chunk, target)  # a write that fails (a full disk) is not: OutputError
            written += len(chunk)
    if written != member.size:
        raise CheckpointError(f"{member.name} in {tar_path} is truncated ({written} of {member.size} bytes)")
