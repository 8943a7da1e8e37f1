"""effconv download against a local mirror on 127.0.0.1: resume, checksums, HTTP errors, safe extraction."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from effconv.errors import CheckpointError, OutputError, UsageError
from effconv.output import writing
from effconv.zoo import catalogue
from effconv.zoo.download import download, find_downloaded, resolve_source
from tests.support.helpers import run_cli
from tests.support.mirror_server import serve

B0 = catalogue.get_entry("tf_efficientnet_b0.in1k")  # ckpts/efficientnet-b0.tar.gz
FAST = {"backoff": 0.0, "timeout": 10.0}


def _tar(members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (symlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return buf.getvalue()


def _toy_checkpoint(size: int = 300_000) -> bytes:
    """A tarball shaped like an official one (the bytes inside need not be a valid bundle here)."""
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    return _tar({"efficientnet-b0/model.ckpt.index": b"index", "efficientnet-b0/model.ckpt.data-00000-of-00001": data})


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def toy():
    return _toy_checkpoint()


@pytest.fixture
def mirror(toy):
    with serve({"/" + B0.file: toy}) as m:
        yield m


def test_download_extracts_and_records_sha256(mirror, toy, tmp_path):
    seen = []
    got = download(B0, tmp_path, base_url=mirror.url, progress=lambda done, total: seen.append((done, total)), **FAST)
    assert got.fetched and got.archive == tmp_path / "ckpts" / "efficientnet-b0.tar.gz"
    assert got.archive.read_bytes() == toy and got.sha256 == _sha(toy)
    record = json.loads((tmp_path / "ckpts" / "efficientnet-b0.tar.gz.sha256.json").read_text())
    assert record["sha256"] == _sha(toy) and record["bytes"] == len(toy) and record["url"].startswith(mirror.url)
    assert sorted(p.name for p in got.checkpoint_dir.iterdir()) == [
        "model.ckpt.data-00000-of-00001",
        "model.ckpt.index",
    ]
    assert got.checkpoint_dir == tmp_path / "ckpts" / "efficientnet-b0"
    assert seen[-1] == (len(toy), len(toy)) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert not list(tmp_path.rglob("*.part*"))
    again = download(B0, tmp_path, base_url=mirror.url, **FAST)  # present: checked, not fetched
    assert not again.fetched and again.sha256 == got.sha256 and len(mirror.requests) == 1


def test_interrupted_transfer_resumes_with_range(mirror, toy, tmp_path):
    mirror.faults = ["cut:100000"]
    with pytest.raises(CheckpointError, match="run the same command again to resume"):
        download(B0, tmp_path, base_url=mirror.url, retries=0, **FAST)
    part = tmp_path / "ckpts" / "efficientnet-b0.tar.gz.part"
    assert part.stat().st_size == 100_000
    got = download(B0, tmp_path, base_url=mirror.url, **FAST)
    assert mirror.requests[-1].range == "bytes=100000-" and mirror.requests[-1].if_range == mirror.etag("/" + B0.file)
    assert got.archive.read_bytes() == toy and not part.exists()


def test_retries_resume_within_one_run(mirror, toy, tmp_path):
    mirror.faults = ["cut:1000", "hangup", "500", "cut:50000"]
    got = download(B0, tmp_path, base_url=mirror.url, retries=4, **FAST)
    assert got.archive.read_bytes() == toy
    assert [r.range for r in mirror.requests] == [None, "bytes=1000-", "bytes=1000-", "bytes=1000-", "bytes=51000-"]


def test_changed_file_on_server_restarts_from_zero(mirror, toy, tmp_path):
    mirror.faults = ["cut:1000"]
    with pytest.raises(CheckpointError):
        download(B0, tmp_path, base_url=mirror.url, retries=0, **FAST)
    mirror.files["/" + B0.file] = new = _toy_checkpoint(200_000)  # new ETag: If-Range fails, 200 with all of it
    got = download(B0, tmp_path, base_url=mirror.url, **FAST)
    assert got.archive.read_bytes() == new


def test_server_ignoring_range_restarts_from_zero(mirror, toy, tmp_path):
    mirror.faults = ["cut:1000", "ignore-range"]
    got = download(B0, tmp_path, base_url=mirror.url, retries=1, **FAST)
    assert got.archive.read_bytes() == toy


def test_complete_part_file_answered_416(mirror, toy, tmp_path):
    part = tmp_path / "ckpts" / "efficientnet-b0.tar.gz.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(toy)
    part.with_name(part.name + ".json").write_text(json.dumps({"validator": mirror.etag("/" + B0.file)}))
    got = download(B0, tmp_path, base_url=mirror.url, **FAST)
    assert mirror.requests[0].range == f"bytes={len(toy)}-" and got.archive.read_bytes() == toy


def test_corrupted_archive_is_refused_then_force_downloads_again(mirror, toy, tmp_path):
    got = download(B0, tmp_path, base_url=mirror.url, extract=False, **FAST)
    assert got.checkpoint_dir is None
    damaged = bytearray(toy)
    damaged[5000] ^= 0xFF
    got.archive.write_bytes(bytes(damaged))
    with pytest.raises(CheckpointError, match="corrupted: sha256 .* differs from the recorded"):
        download(B0, tmp_path, base_url=mirror.url, **FAST)
    fixed = download(B0, tmp_path, base_url=mirror.url, force=True, **FAST)
    assert fixed.fetched and fixed.archive.read_bytes() == toy


def test_pinned_checksum_mismatch_deletes_the_download(mirror, tmp_path):
    pinned = dataclasses.replace(B0, sha256="0" * 64)
    with pytest.raises(CheckpointError, match="differs from the catalogue's"):
        download(pinned, tmp_path, base_url=mirror.url, **FAST)
    assert not list(tmp_path.rglob("*.tar.gz*"))


def test_404_is_not_retried(mirror, tmp_path):
    missing = dataclasses.replace(B0, file="ckpts/efficientnet-b9.tar.gz")
    with pytest.raises(CheckpointError, match="HTTP 404"):
        download(missing, tmp_path, base_url=mirror.url, retries=3, **FAST)
    assert len(mirror.requests) == 1


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_a_full_disk_is_an_output_error_and_not_retried(mirror, tmp_path, monkeypatch):
    """A dropped connection is retried; a write that fails is not the server's fault and would fail again."""
    monkeypatch.setattr(writing, "create", lambda path, mode="xb": open("/dev/full", "wb", buffering=0))
    with pytest.raises(OutputError, match=r"cannot write .*efficientnet-b0.tar.gz.part: No space left on device"):
        download(B0, tmp_path, base_url=mirror.url, retries=3, **FAST)
    assert len(mirror.requests) == 1


def test_an_unwritable_download_folder_is_an_output_error(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(OutputError, match="cannot create download folder"):
        download(B0, tmp_path / "file", base_url="http://127.0.0.1:9", **FAST)


def test_server_closing_early_every_time(mirror, tmp_path):
    mirror.faults = ["hangup"] * 3
    with pytest.raises(CheckpointError, match="failed after 3 attempts"):
        download(B0, tmp_path, base_url=mirror.url, retries=2, **FAST)


def test_nothing_listening(tmp_path):
    with serve({}) as m:
        url = m.url
    with pytest.raises(CheckpointError, match="failed after 1 attempts"):
        download(B0, tmp_path, base_url=url, retries=0, **FAST)


def test_download_size_limit(mirror, tmp_path):
    with pytest.raises(CheckpointError, match="download limit"):
        download(B0, tmp_path, base_url=mirror.url, max_bytes=1000, **FAST)


@pytest.mark.parametrize(
    "members, symlinks, message",
    [
        (
            {"efficientnet-b0/model.ckpt.data-00000-of-00001": b"x"},
            {"efficientnet-b0/model.ckpt.index": "/etc/passwd"},
            "symlink",
        ),
        ({"../escape/model.ckpt.index": b"i", "../escape/model.ckpt.data-00000-of-00001": b"d"}, None, "unsafe path"),
        ({"/abs/model.ckpt.index": b"i", "/abs/model.ckpt.data-00000-of-00001": b"d"}, None, "unsafe path"),
    ],
)
def test_unsafe_tarballs_are_not_extracted(tmp_path, members, symlinks, message):
    with serve({"/" + B0.file: _tar(members, symlinks)}) as m:
        with pytest.raises(CheckpointError, match=message):
            download(B0, tmp_path / "dest", base_url=m.url, **FAST)
    assert not (tmp_path / "escape").exists() and not (tmp_path / "dest" / "ckpts" / "efficientnet-b0").exists()
    assert not [p for p in (tmp_path / "dest" / "ckpts").iterdir() if p.name.startswith(".")]  # no temp left


def test_extraction_size_cap(mirror, tmp_path):
    with pytest.raises(CheckpointError, match="over the 1000-byte limit"):
        download(B0, tmp_path, base_url=mirror.url, max_extract_bytes=1000, **FAST)


def test_base_url_from_environment(mirror, toy, tmp_path, monkeypatch):
    monkeypatch.setenv("EFFCONV_BASE_URL", mirror.url + "/")
    assert B0.url() == f"{mirror.url}/{B0.file}"
    assert download(B0, tmp_path, **FAST).archive.read_bytes() == toy


def test_default_destination_is_the_cache(mirror, tmp_path, monkeypatch):
    monkeypatch.setenv("EFFCONV_CACHE", str(tmp_path / "cache"))
    got = download(B0, base_url=mirror.url, **FAST)
    assert got.archive == tmp_path / "cache" / "checkpoints" / B0.file
    assert find_downloaded(B0) == got.checkpoint_dir


def test_resolve_source(mirror, tmp_path):
    assert resolve_source("some/dir", None, None, tmp_path) == ("some/dir", None, None)  # not a name: unchanged
    with pytest.raises(UsageError, match="effconv download efficientnet-b0_3rdparty_8xb32_in1k --dest"):
        resolve_source("tf_efficientnet_b0.in1k", None, None, tmp_path)
    download(B0, tmp_path, base_url=mirror.url, extract=False, **FAST)
    assert resolve_source(B0.name, None, None, tmp_path) == (str(tmp_path / B0.file), "standard", 224)
    download(B0, tmp_path, base_url=mirror.url, **FAST)
    assert resolve_source(B0.name, "aa", 300, tmp_path) == (str(tmp_path / B0.stem), "aa", 300)  # given wins


# ---- the real thing: the official-format b0 fixture, served, downloaded, converted by name ----------------------


@pytest.fixture(scope="module")
def fixture_tarball(fixture_ckpt) -> bytes:
    """The fixture as the official bucket would serve it: one folder, plain tar despite the .tar.gz name."""
    return _tar({f"efficientnet-b0/{p.name}": p.read_bytes() for p in sorted(fixture_ckpt.iterdir())})


def test_cli_download_then_convert_by_name(fixture_tarball, tmp_path):
    dest = tmp_path / "zoo"
    with serve({"/" + B0.file: fixture_tarball}) as m:
        result = run_cli("download", "tf_efficientnet_b0.in1k", "--dest", dest, "--base-url", m.url, "-q")
    assert result.exit_code == 0, result.output
    assert "downloaded" in result.output and (dest / B0.stem / "model.ckpt.index").is_file()
    out = tmp_path / "b0.pth"
    result = run_cli("convert", "--src", B0.name, "--dest", dest, "--out", out, "-q")
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output  # the catalogue says 'standard': no guessing
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["variant"] == "standard" and card["arch"] == "b0" and card["weights"] == "ema"
    assert Path(card["source"]["path"]) == dest / B0.stem


def test_cli_download_errors(tmp_path):
    result = run_cli("download", "efficientnet-b99", "--dest", tmp_path)
    assert result.exit_code == 2 and "not in the catalogue" in result.output
    result = run_cli("convert", "--src", B0.name, "--dest", tmp_path, "--out", tmp_path / "x.pth")
    assert result.exit_code == 2 and "is not downloaded" in result.output
    with serve({}) as m:
        result = run_cli("download", B0.name, "--dest", tmp_path, "--base-url", m.url, "-q")
    assert result.exit_code == 2 and "HTTP 404" in result.output


# ---- --force: the good copy stays until the new one is complete and checked ------------------------------------


def _snapshot(dest: Path) -> dict[str, bytes]:
    """Every file under `dest` (hidden ones too) by relative path: what a failed forced download must not change."""
    return {str(p.relative_to(dest)): p.read_bytes() for p in sorted(dest.rglob("*")) if p.is_file()}


@pytest.fixture
def downloaded(mirror, tmp_path) -> Path:
    download(B0, tmp_path, base_url=mirror.url, **FAST)
    return tmp_path


def test_failed_forced_download_keeps_the_good_copy(downloaded):
    before = _snapshot(downloaded)
    assert {B0.file, B0.file + ".sha256.json", B0.stem + "/model.ckpt.index"} <= set(before)
    with pytest.raises(CheckpointError) as error:
        download(B0, downloaded, base_url="http://127.0.0.1:1", force=True, retries=0, **FAST)
    message = str(error.value)
    assert "nothing received" in message and "kept as it was" in message
    assert ".part" not in message  # no part file was written: none is named
    assert _snapshot(downloaded) == before


def test_failed_forced_download_through_the_cli(downloaded):
    before = _snapshot(downloaded)
    args = ("download", B0.name, "--dest", downloaded, "--base-url", "http://127.0.0.1:1", "--force", "--retries", "0")
    result = run_cli(*args, "-q")
    assert result.exit_code == 2, result.output
    assert ".part" not in result.stderr and "kept as it was" in result.stderr, result.stderr
    assert _snapshot(downloaded) == before


def test_forced_download_of_a_bad_copy_keeps_the_good_one(downloaded, mirror):
    """A new copy that arrives whole but holds no safe checkpoint is not put in place of the good one."""
    before = _snapshot(downloaded)
    unsafe = {"../escape/model.ckpt.index": b"i", "../escape/model.ckpt.data-00000-of-00001": b"d"}
    mirror.files["/" + B0.file] = _tar(unsafe)
    with pytest.raises(CheckpointError, match="unsafe path .*kept as it was"):
        download(B0, downloaded, base_url=mirror.url, force=True, **FAST)
    assert _snapshot(downloaded) == before  # no .part, no hidden folder, the old files unchanged


def test_forced_download_replaces_tarball_record_and_checkpoint(downloaded, mirror):
    new = _toy_checkpoint(200_000)
    mirror.files["/" + B0.file] = new
    got = download(B0, downloaded, base_url=mirror.url, force=True, **FAST)
    assert got.fetched and got.archive.read_bytes() == new and got.sha256 == _sha(new)
    assert json.loads((downloaded / (B0.file + ".sha256.json")).read_text())["sha256"] == _sha(new)
    with tarfile.open(fileobj=io.BytesIO(new)) as tar:
        data = tar.extractfile("efficientnet-b0/model.ckpt.data-00000-of-00001").read()
    assert (got.checkpoint_dir / "model.ckpt.data-00000-of-00001").read_bytes() == data  # extracted anew
    assert sorted(p.name for p in (downloaded / "ckpts").iterdir()) == [
        "efficientnet-b0",
        "efficientnet-b0.tar.gz",
        "efficientnet-b0.tar.gz.sha256.json",
    ]  # nothing half-done or set aside is left


def test_get_model_after_a_forced_download_of_other_weights_is_not_stale(fixture_ckpt, tmp_path, monkeypatch):
    """get_model's converted cache is keyed by the tarball's sha256: new weights fetched by --force are converted."""
    import effconv
    from tests.support.checkpoints import read_tensor, with_values

    bias = "efficientnet-b0/head/dense/bias/ExponentialMovingAverage"  # the head's EMA bias: what the model uses
    changed = with_values(fixture_ckpt, tmp_path / "changed", {bias: read_tensor(fixture_ckpt, bias) + 1.0})
    files = ("model.ckpt.index", "model.ckpt.data-00000-of-00001")
    tarballs = [_tar({f"efficientnet-b0/{f}": (c / f).read_bytes() for f in files}) for c in (fixture_ckpt, changed)]
    monkeypatch.setenv("EFFCONV_CACHE", str(tmp_path / "cache"))
    with serve({"/" + B0.file: tarballs[0]}) as m:
        first = effconv.get_model(B0.name, base_url=m.url)
        m.files["/" + B0.file] = tarballs[1]
        assert run_cli("download", B0.name, "--base-url", m.url, "--force", "-q").exit_code == 0
        second = effconv.get_model(B0.name, base_url=m.url)
    delta = second.state_dict()["classifier.bias"] - first.state_dict()["classifier.bias"]
    assert torch.allclose(delta, torch.ones_like(delta))  # the new weights, not the first conversion
    assert second.card["source"]["archive"]["sha256"] == _sha(tarballs[1]) != _sha(tarballs[0])
