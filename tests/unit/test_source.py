"""resolve_checkpoint: every way a user may point at a checkpoint, and tarballs that must be refused."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

from effconv.errors import CheckpointError, OutputError
from effconv.formats.bundle import TensorBundleReader
from effconv.formats.checkpoint_files import extract_checkpoint, resolve_checkpoint
from effconv.output import writing

FILES = ("checkpoint", "model.ckpt.index", "model.ckpt.data-00000-of-00001", "model.ckpt.meta")
KERNEL = "efficientnet-b0/stem/conv2d/kernel"


def link_fixture(fixture_ckpt: Path, directory: Path, names=FILES) -> Path:
    """The fixture's files, symlinked (not copied) into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        (directory / name).symlink_to(fixture_ckpt / name)
    return directory


def assert_resolves_to(src, prefix: Path) -> None:
    with resolve_checkpoint(src) as files:
        assert files.prefix == prefix
        assert files.origin == Path(src)
        assert files.files == (Path(f"{prefix}.index"), Path(f"{prefix}.data-00000-of-00001"))


# --- local paths --------------------------------------------------------------------


def test_directory_prefix_and_each_file(fixture_ckpt):
    prefix = fixture_ckpt / "model.ckpt"
    for src in (fixture_ckpt, prefix, f"{prefix}.index", f"{prefix}.data-00000-of-00001", f"{prefix}.meta"):
        assert_resolves_to(src, prefix)
    assert_resolves_to(fixture_ckpt / "checkpoint", prefix)


def test_directory_without_state_file_uses_its_only_index(fixture_ckpt, tmp_path):
    link_fixture(fixture_ckpt, tmp_path, FILES[1:])
    assert_resolves_to(tmp_path, tmp_path / "model.ckpt")


def test_parent_of_the_checkpoint_directory(fixture_ckpt, tmp_path):
    link_fixture(fixture_ckpt, tmp_path / "efficientnet-b0")
    (tmp_path / "README").write_text("not a checkpoint")
    assert_resolves_to(tmp_path, tmp_path / "efficientnet-b0" / "model.ckpt")


def test_state_file_with_an_absolute_path_from_the_training_machine(fixture_ckpt, tmp_path):
    link_fixture(fixture_ckpt, tmp_path, FILES[1:])
    (tmp_path / "checkpoint").write_text(
        'model_checkpoint_path: "/bigtrain/run7/model.ckpt"\nall_model_checkpoint_paths: "/bigtrain/run7/model.ckpt"\n'
    )
    assert_resolves_to(tmp_path, tmp_path / "model.ckpt")


def test_state_file_selects_among_several_checkpoints(fixture_ckpt, tmp_path):
    link_fixture(fixture_ckpt, tmp_path, FILES[1:3])
    (tmp_path / "other.ckpt.index").symlink_to(fixture_ckpt / FILES[1])
    (tmp_path / "other.ckpt.data-00000-of-00001").symlink_to(fixture_ckpt / FILES[2])
    with pytest.raises(CheckpointError, match="several checkpoints .*model.ckpt.index, other.ckpt.index"):
        resolve_checkpoint(tmp_path).__enter__()
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "other.ckpt"\n')
    assert_resolves_to(tmp_path, tmp_path / "other.ckpt")


def test_state_file_naming_a_missing_checkpoint(tmp_path):
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "model.ckpt-100"\n')
    with pytest.raises(CheckpointError, match=r"names checkpoint 'model.ckpt-100'.*does not exist"):
        resolve_checkpoint(tmp_path).__enter__()


def test_missing_data_shard(fixture_ckpt, tmp_path):
    link_fixture(fixture_ckpt, tmp_path, FILES[1:2])
    with pytest.raises(CheckpointError, match="no data file model.ckpt.data-00000-of-"):
        resolve_checkpoint(tmp_path / "model.ckpt").__enter__()
    (tmp_path / "model.ckpt.data-00001-of-00002").write_bytes(b"")
    with pytest.raises(CheckpointError, match="missing data shard model.ckpt.data-00000-of-00002"):
        resolve_checkpoint(tmp_path / "model.ckpt").__enter__()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing", "no such checkpoint: .*missing"),
        (lambda d: d / "model.ckpt", "no such checkpoint: .*model.ckpt"),
        (lambda d: d / "sub", "directory .*sub is empty"),
        (lambda d: d / "notes.txt", "notes.txt is not a TensorFlow checkpoint"),
        (lambda d: d / "lonely.index", "no data file lonely.data-00000-of-"),
        (lambda d: d / "full", "no TensorFlow checkpoint in .*full"),
        (lambda d: d / "bad.tar.gz", "cannot extract a checkpoint from .*bad.tar.gz"),
    ],
    ids=["missing", "missing-prefix", "empty-dir", "other-file", "index-only", "dir-without-ckpt", "bad-gzip"],
)
def test_not_a_checkpoint(tmp_path, make, message):
    (tmp_path / "sub").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("x")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "lonely.index").write_bytes(b"\0")
    (tmp_path / "bad.tar.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(CheckpointError, match=message):
        resolve_checkpoint(make(tmp_path)).__enter__()


# --- tarballs -----------------------------------------------------------------------


def tar_fixture(fixture_ckpt: Path, path: Path, directory: str, mode: str) -> Path:
    kwargs = {"compresslevel": 1} if mode == "w:gz" else {}
    with tarfile.open(path, mode, **kwargs) as tar:
        for name in FILES:
            tar.add(fixture_ckpt / name, arcname=f"{directory}/{name}")
    return path


@pytest.fixture(scope="module")
def tarballs(fixture_ckpt, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tarballs")
    return {
        "gz": tar_fixture(
            fixture_ckpt, d / "noisy_student_efficientnet-b0.tar.gz", "noisy_student_efficientnet-b0", "w:gz"
        ),
        # As some official downloads are: a plain tar behind a .tar.gz name.
        "plain-as-gz": tar_fixture(fixture_ckpt, d / "efficientnet-b0.tar.gz", "./noisy-student-efficientnet-b0", "w"),
        "tar": tar_fixture(fixture_ckpt, d / "ckpt.tar", "some/nested/dir", "w"),
    }


@pytest.mark.parametrize("kind", ["gz", "plain-as-gz", "tar"])
def test_tarball_extracts_only_the_checkpoint(fixture_ckpt, tarballs, kind):
    expected = TensorBundleReader(fixture_ckpt / "model.ckpt").read(KERNEL)
    with resolve_checkpoint(tarballs[kind]) as files:
        tmp = files.prefix.parent
        assert files.origin == tarballs[kind] and files.prefix.name == "model.ckpt"
        assert sorted(p.name for p in tmp.iterdir()) == ["model.ckpt.data-00000-of-00001", "model.ckpt.index"]
        assert files.files == (tmp / "model.ckpt.index", tmp / "model.ckpt.data-00000-of-00001")
        with TensorBundleReader(files.prefix) as reader:
            assert len(reader) == 623
            np.testing.assert_array_equal(reader.read(KERNEL), expected)
    assert not tmp.exists()


def test_temporary_directory_is_removed_on_error(tarballs):
    with pytest.raises(RuntimeError), resolve_checkpoint(tarballs["tar"]) as files:
        tmp = files.prefix.parent
        raise RuntimeError("conversion failed")
    assert not tmp.exists()


def make_tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                name, data = member
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def link_member(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


DATA = ("ckpt/model.ckpt.data-00000-of-00001", b"\0" * 64)
INDEX = ("ckpt/model.ckpt.index", b"\1" * 64)


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([("../model.ckpt.index", b"x"), ("../model.ckpt.data-00000-of-00001", b"x")], "unsafe path '../model"),
        ([("/abs/model.ckpt.index", b"x"), ("/abs/model.ckpt.data-00000-of-00001", b"x")], "unsafe path '/abs"),
        ([link_member(INDEX[0], "/etc/passwd", tarfile.SYMTYPE), DATA], "model.ckpt.index .* is a symlink"),
        ([INDEX, link_member(DATA[0], "ckpt/model.ckpt.index", tarfile.LNKTYPE)], "is a hard link"),
        ([INDEX, link_member(DATA[0], "", tarfile.FIFOTYPE)], "is not a regular file"),
        ([INDEX, DATA, ("ckpt/model.ckpt.index", b"again")], "appears twice"),
        ([INDEX], "no data file model.ckpt.data-00000-of-"),
        ([("ckpt/model.ckpt.meta", b"x"), DATA], r"no TensorFlow checkpoint \(\*.index\) inside"),
        ([INDEX, DATA, ("b/model.ckpt.index", b"x")], "several checkpoints: b/model.ckpt, ckpt/model.ckpt"),
    ],
    ids=["dotdot", "absolute", "symlink", "hardlink", "fifo", "duplicate", "no-data", "no-index", "ambiguous"],
)
def test_bad_tarballs_are_refused(tmp_path, members, message):
    tarball = make_tar(tmp_path / "evil.tar.gz", members)
    with pytest.raises(CheckpointError, match=message):
        resolve_checkpoint(tarball).__enter__()
    assert not (tmp_path / "model.ckpt.index").exists() and not Path("/model.ckpt.index").exists()


def test_tarball_state_file_chooses_among_several(tmp_path):
    members = [INDEX, DATA, ("b/model.ckpt.index", b"x"), ("ckpt/checkpoint", b'model_checkpoint_path: "model.ckpt"')]
    with resolve_checkpoint(make_tar(tmp_path / "two.tgz", members)) as files:
        assert files.prefix.name == "model.ckpt"
        assert Path(f"{files.prefix}.index").read_bytes() == INDEX[1]


def test_tarball_over_the_size_limit(tmp_path):
    tarball = make_tar(tmp_path / "big.tar.gz", [INDEX, DATA])
    with pytest.raises(CheckpointError, match="over the 100-byte limit"):
        resolve_checkpoint(tarball, max_extract_bytes=100).__enter__()
    with resolve_checkpoint(tarball, max_extract_bytes=128) as files:
        assert os.path.getsize(files.files[1]) == 64


def test_unreadable_tarball_is_one_line(tmp_path):
    # tarfile lists a reason per compression it tried, one per line; found by tests/robustness/test_fuzz.py.
    tarball = tmp_path / "ckpt.tar"
    tarball.write_bytes(b"\1" * 2048)
    with pytest.raises(CheckpointError, match=r"cannot extract a checkpoint from .*ckpt.tar: .*\(.*gz.*\)") as e:
        resolve_checkpoint(tarball).__enter__()
    assert "\n" not in str(e.value)


def test_tarball_with_too_many_members(tmp_path, monkeypatch):
    monkeypatch.setattr("effconv.formats.checkpoint_files._MAX_TAR_MEMBERS", 10)
    tarball = make_tar(tmp_path / "many.tar.gz", [INDEX, DATA, *[(f"ckpt/empty{i}", b"") for i in range(9)]])
    with pytest.raises(CheckpointError, match="many.tar.gz holds more than 10 members; not a checkpoint tarball"):
        resolve_checkpoint(tarball).__enter__()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_a_full_disk_while_extracting_is_an_output_error(tmp_path, monkeypatch):
    """Not the tarball's fault: the error must not call the checkpoint corrupt."""
    tarball = make_tar(tmp_path / "ok.tar.gz", [INDEX, DATA])
    monkeypatch.setattr(writing, "create", lambda path, mode="xb": open("/dev/full", "wb", buffering=0))
    (tmp_path / "dest").mkdir()
    with pytest.raises(OutputError, match=r"cannot write .*model\.ckpt\.\S+: No space left on device"):
        extract_checkpoint(tarball, tmp_path / "dest")
