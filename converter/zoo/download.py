"""Fetch catalogue checkpoints over HTTP: resumable, checksummed, extracted safely.

Layout under the destination folder (by default `<cache>/checkpoints`), mirroring the official bucket so that
the file paths keep naming the variant (`advprop/`, `noisystudent/`, ...):

    advprop/efficientnet-b0.tar.gz              the tarball as served
    advprop/efficientnet-b0.tar.gz.sha256.json  its sha256, recorded on first download, checked on every later run
    advprop/efficientnet-b0/                    the checkpoint extracted from it (index + data shards)

An interrupted download leaves `X.part` (and `X.part.json`, the server's validator); the next run asks for the
rest with an HTTP Range request, and starts over if the file on the server has changed.
"""

from __future__ import annotations

import contextlib
import datetime
import http.client
import json
import os
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from effconv import __version__
from effconv.errors import CheckpointError, OutputError, UsageError
from effconv.formats.checkpoint_files import MAX_EXTRACT_BYTES, extract_checkpoint
from effconv.output import writing
from effconv.output.hashing import sha256_file
from effconv.zoo.catalogue import CatalogueEntry, lookup

CACHE_ENV = "EFFCONV_CACHE"
MAX_DOWNLOAD_BYTES = 16 * 2**30  # the largest official tarball (L2) is about 2 GB
ProgressFn = Callable[[int, "int | None"], None]  # (bytes on disk, bytes expected or None)

_CHUNK = 1 << 20
_CONTENT_RANGE_RE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)")


def cache_dir() -> Path:
    """effconv's cache: $EFFCONV_CACHE, else $XDG_CACHE_HOME/effconv, else ~/.cache/effconv."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "effconv"


def default_download_dir() -> Path:
    return cache_dir() / "checkpoints"


@dataclass(frozen=True)
class Download:
    """Where one catalogue checkpoint sits on disk, and what this run did."""

    entry: CatalogueEntry
    archive: Path
    sha256: str
    checkpoint_dir: Path | None  # None when not extracted
    fetched: bool  # False: the archive was already there and passed its checksum


def archive_path(entry: CatalogueEntry, dest: str | os.PathLike) -> Path:
    return Path(dest) / entry.file


def checkpoint_dir(entry: CatalogueEntry, dest: str | os.PathLike) -> Path:
    return Path(dest) / entry.stem


def _record_path(archive: Path) -> Path:
    return archive.with_name(archive.name + ".sha256.json")


def _part_paths(archive: Path) -> tuple[Path, Path]:
    return archive.with_name(archive.name + ".part"), archive.with_name(archive.name + ".part.json")


def download(
    entry: CatalogueEntry,
    dest: str | os.PathLike | None = None,
    *,
    base_url: str | None = None,
    extract: bool = True,
    force: bool = False,
    progress: ProgressFn | None = None,
    retries: int = 3,
    timeout: float = 60.0,
    backoff: float = 1.0,
    max_bytes: int = MAX_DOWNLOAD_BYTES,
    max_extract_bytes: int = MAX_EXTRACT_BYTES,
) -> Download:
    """Make `entry`'s tarball (and, with `extract`, its checkpoint) present and verified under `dest`.

    A tarball already there is checked against the sha256 recorded when it was downloaded; a mismatch is an
    error (`force` downloads it again). A failed transfer is retried `retries` times, resuming each time.
    A new copy is fetched to `X.part`, checked (sha256, then extracted aside) and only then put in place of
    the tarball, its checksum record and the extracted checkpoint: with `force`, a fetch or a check that
    fails leaves what was there as it was.
    """
    dest = Path(dest) if dest is not None else default_download_dir()
    archive = archive_path(entry, dest)
    try:
        archive.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create download folder {archive.parent}: {e.strerror or e}") from e
    if force:
        _remove(*_part_paths(archive))  # a fresh copy: not the rest of an earlier attempt
    had_archive = archive.is_file()
    fetched = force or not had_archive
    if not fetched:
        digest = _verify_present(entry, archive)
        extracted = _extract(entry, archive, dest, max_extract_bytes) if extract else None
        return Download(entry, archive, digest, extracted, fetched)
    url = entry.url(base_url)
    target = checkpoint_dir(entry, dest) if extract else None
    if target is not None and not force:
        _check_extraction_target(target)
    try:
        _fetch(url, archive, progress, retries=retries, timeout=timeout, backoff=backoff, max_bytes=max_bytes)
        digest = _install_part(entry, archive, url, target, max_extract_bytes)
    except CheckpointError as e:
        if had_archive:
            raise CheckpointError(f"{e}; the copy already in {archive} is kept as it was") from None
        raise
    return Download(entry, archive, digest, target, fetched)


def find_downloaded(entry: CatalogueEntry, dest: str | os.PathLike | None = None) -> Path | None:
    """The extracted checkpoint of `entry` under `dest`, else its tarball, else None."""
    dest = Path(dest) if dest is not None else default_download_dir()
    folder = checkpoint_dir(entry, dest)
    if folder.is_dir() and any(folder.glob("*.index")):
        return folder
    archive = archive_path(entry, dest)
    return archive if archive.is_file() else None


def resolve_source(
    src: str, variant: str | None, image_size: int | None, dest: str | os.PathLike | None = None
) -> tuple[str, str | None, int | None]:
    """`effconv convert --src NAME`: a catalogue name that is not a path means its downloaded checkpoint.

    Returns (source path, variant, image size), the last two from the catalogue unless given. Anything else
    passes through unchanged, for the checkpoint resolution to judge.
    """
    if Path(src).expanduser().exists() or Path(f"{src}.index").expanduser().exists():
        return src, variant, image_size
    entry = lookup(src)
    if entry is None:
        return src, variant, image_size
    found = find_downloaded(entry, dest)
    if found is None:
        where = Path(dest) if dest is not None else default_download_dir()
        option = f" --dest {where}" if dest is not None else ""
        raise UsageError(f"{src} is not downloaded in {where}: run `effconv download {entry.name}{option}` first")
    return str(found), variant or entry.variant, image_size or entry.image_size


# --- checksums ------------------------------------------------------------------------


def _install_part(entry: CatalogueEntry, archive: Path, url: str, target: Path | None, max_extract_bytes: int) -> str:
    """Check the finished `.part` file, then put it (and its checkpoint, into `target`) in place of the old ones.

    Checked: its sha256 against the catalogue's, and, with a `target`, its extraction into a hidden folder
    beside it. A part that fails either is deleted; the old tarball, record and checkpoint are touched only
    once both passed, each replaced by one rename.
    """
    part, meta = _part_paths(archive)
    digest = sha256_file(part)
    problem = _mismatch(entry, digest, None)
    if problem:
        _remove(part, meta)
        raise CheckpointError(f"downloaded {url}: {problem}; deleted it")
    fresh = None
    try:
        if target is not None:
            fresh = _new_folder_beside(target)
            try:
                extract_checkpoint(part, fresh, max_extract_bytes)
            except CheckpointError:
                _remove(part, meta)  # complete and as served, but no checkpoint: resuming it cannot help
                raise
        record = _record(archive, url, digest, part.stat().st_size)
        with writing.writing(archive):
            os.replace(part, archive)
        _write_json(_record_path(archive), record)
        _remove(meta)
        if fresh is not None:
            with writing.writing(target):
                _replace_folder(fresh, target)
    finally:
        if fresh is not None:
            _remove_tree(fresh)
    return digest


def _verify_present(entry: CatalogueEntry, archive: Path) -> str:
    """Re-hash a tarball already on disk against its record (a file placed by hand gets one now)."""
    record = _read_record(archive)
    digest = sha256_file(archive)
    problem = _mismatch(entry, digest, record)
    if problem:
        raise CheckpointError(f"{archive} is corrupted: {problem}; download it again with --force")
    if record is None:
        _write_json(_record_path(archive), _record(archive, None, digest, archive.stat().st_size))
    return digest


def _read_record(archive: Path) -> dict | None:
    path = _record_path(archive)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        str(record["sha256"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checksum record {path} is unreadable ({e}); delete it to record a new one") from e
    return record


def recorded_sha256(archive: Path) -> str | None:
    """The sha256 recorded for a downloaded tarball (no re-hashing), or None when there is no usable record."""
    try:
        record = _read_record(archive)
    except CheckpointError:
        return None
    return None if record is None else str(record["sha256"]).lower()


def _record(archive: Path, url: str | None, digest: str, size: int) -> dict:
    return {
        "file": archive.name,
        "url": url,
        "bytes": size,
        "sha256": digest,
        "recorded": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "effconv_version": __version__,
    }


def _mismatch(entry: CatalogueEntry, digest: str, record: dict | None) -> str | None:
    """Why `digest` is wrong for `entry` (the catalogue's pinned value, then the recorded one), or None."""
    for expected, whose in ((entry.sha256, "the catalogue's"), (record and record["sha256"], "the recorded")):
        if expected and str(expected).lower() != digest:
            return f"sha256 {digest} differs from {whose} {expected}"
    return None


# --- HTTP -----------------------------------------------------------------------------


class _Interrupted(Exception):
    """The transfer stopped early; the part file keeps what arrived."""


class _StaleRange(_Interrupted):
    """The server's answer to a range request does not continue our part file: start again."""


def _fetch(
    url: str,
    archive: Path,
    progress: ProgressFn | None,
    *,
    retries: int,
    timeout: float,
    backoff: float,
    max_bytes: int,
) -> None:
    part, meta = _part_paths(archive)
    failures = 0
    while True:
        try:
            _fetch_once(url, part, meta, progress, timeout, max_bytes)
            return
        except urllib.error.HTTPError as e:
            if e.code == 416 and _range_was_complete(e, part):
                return
            if e.code == 416:  # what we hold does not fit the file on the server any more
                _remove(part, meta)
            elif e.code < 500 and e.code != 408 and e.code != 429:
                raise CheckpointError(f"cannot download {url}: HTTP {e.code} {e.reason}") from None
            reason = f"HTTP {e.code} {e.reason}"
        except (_Interrupted, urllib.error.URLError, http.client.HTTPException, OSError) as e:
            if isinstance(e, _StaleRange):
                _remove(part, meta)
            reason = str(getattr(e, "reason", None) or e) or type(e).__name__
        failures += 1
        if failures > retries:
            held = part.stat().st_size if part.is_file() else 0
            kept = f"{held} bytes kept in {part}, run the same command again to resume" if held else "nothing received"
            raise CheckpointError(f"download of {url} failed after {failures} attempts ({reason}); {kept}")
        time.sleep(min(backoff * 2 ** (failures - 1), 30.0))


def _fetch_once(url: str, part: Path, meta: Path, progress: ProgressFn | None, timeout: float, max_bytes: int) -> None:
    offset = part.stat().st_size if part.is_file() else 0
    validator = _read_validator(meta) if offset else None
    if offset and validator is None:  # cannot tell whether the server's file is still the one we began
        _remove(part)
        offset = 0
    request = urllib.request.Request(url, headers={"User-Agent": f"effconv/{__version__}"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
        request.add_header("If-Range", validator)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        total = _expected_total(response, offset)
        if response.status == 200:
            offset = 0  # the server sent the whole file: the old part is stale or ranges are not supported
        if total is not None and total > max_bytes:
            raise CheckpointError(f"{url} is {total} bytes, over the {max_bytes}-byte download limit")
        new_validator = response.headers.get("ETag") or response.headers.get("Last-Modified")
        _write_json(meta, {"url": url, "validator": new_validator, "total": total})
        done = offset
        with writing.create(part, "ab" if offset else "wb") as out:
            if progress:
                progress(done, total)
            while block := response.read(_CHUNK):  # a read that fails is retried ...
                writing.write_all(out, block, part)  # ... a write that fails (a full disk) is not: OutputError
                done += len(block)
                if done > max_bytes:
                    raise CheckpointError(f"{url} sends more than the {max_bytes}-byte download limit")
                if progress:
                    progress(done, total)
    if total is not None and done != total:
        raise _Interrupted(f"connection closed at {done} of {total} bytes")


def _expected_total(response, offset: int) -> int | None:
    """Size of the whole file, checking that a partial response starts where our part file ends."""
    if response.status == 206:
        match = _CONTENT_RANGE_RE.fullmatch(response.headers.get("Content-Range", "").strip())
        if not match or match[1] is None or int(match[1]) != offset:
            raise _StaleRange(f"server answered a range request with {response.headers.get('Content-Range')!r}")
        return None if match[3] == "*" else int(match[3])
    length = response.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def _range_was_complete(error: urllib.error.HTTPError, part: Path) -> bool:
    """A 416 to `bytes=N-` with the file being N bytes long: the part already holds everything."""
    match = _CONTENT_RANGE_RE.fullmatch((error.headers.get("Content-Range") or "").strip())
    return bool(match and match[3] not in (None, "*") and part.is_file() and int(match[3]) == part.stat().st_size)


def _read_validator(meta: Path) -> str | None:
    try:
        return json.loads(meta.read_text()).get("validator")
    except (OSError, ValueError, AttributeError):
        return None


# --- files ----------------------------------------------------------------------------


def _extract(entry: CatalogueEntry, archive: Path, dest: Path, max_bytes: int) -> Path:
    """Extract into a hidden sibling folder, then rename it into place: never a half-extracted checkpoint."""
    target = checkpoint_dir(entry, dest)
    if target.is_dir() and any(target.glob("*.index")):
        return target
    _check_extraction_target(target)
    tmp = _new_folder_beside(target)
    try:
        extract_checkpoint(archive, tmp, max_bytes)
        with writing.writing(target):
            os.replace(tmp, target)
    finally:
        _remove_tree(tmp)
    return target


def _check_extraction_target(target: Path) -> None:
    """Refuse to put a checkpoint where something else is (a checkpoint already there is replaced)."""
    if (target.exists() or target.is_symlink()) and not (target.is_dir() and any(target.glob("*.index"))):
        raise UsageError(f"{target} exists but holds no checkpoint; remove it or use --force")


def _new_folder_beside(target: Path) -> Path:
    with writing.writing(target):
        return Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))


def _replace_folder(new: Path, target: Path) -> None:
    """Rename `new` to `target`; an old `target` is moved aside first and deleted only once `new` is in place."""
    if target.is_symlink() or (target.exists() and not target.is_dir()):  # a link (what it points to is kept)
        target.unlink()  # or a file, where --force puts the checkpoint
    if not target.exists():
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", suffix=".tmp", dir=target.parent))
    os.replace(target, old)  # onto the empty folder just made: a rename, nothing copied
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    _remove_tree(old)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with writing.writing(path):
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)


def _remove(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _remove_tree(path: Path) -> None:
    if path.is_symlink():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
