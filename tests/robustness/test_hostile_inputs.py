"""Issue 11's hostile inputs: each is refused with one line, exit 2, promptly, and leaves nothing behind.

- a data shard that is a named pipe, or a link to /dev/zero: nothing may open or read it (the sha256 thread
  did, and kept the process alive after the error);
- a compression bomb: refused at the header that declares too much, not after reading the archive through;
- NaN or Inf in a weight with a valid checksum: refused naming the tensor, kept only with --allow-nonfinite;
- a flipped byte in a tensor the conversion does not use: every tensor's crc32c is checked;
- two conversions racing for one --out: the second fails with "output exists", never replaces the first.

SIGTERM mid-write is in test_crash_safety.py.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from effconv.errors import CheckpointError, UsageError
from effconv.formats.bundle import TensorBundleReader
from effconv.formats.checkpoint_files import extract_checkpoint
from effconv.output.artifact import ArtifactWriter
from tests.support.checkpoints import DATA, read_tensor, with_values
from tests.support.helpers import run_cli

STEM = "efficientnet-b0/stem/conv2d/kernel"  # the raw copy: unused, the EMA copy is converted
STEM_EMA = STEM + "/ExponentialMovingAverage"
HEAD_BIAS_EMA = "efficientnet-b0/head/dense/bias/ExponentialMovingAverage"
PROMPTLY = 60  # seconds: generous for a loaded machine; the runs below take a few


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "effconv.cli", *map(str, args)]


def run_promptly(command: list[str]) -> subprocess.CompletedProcess:
    """Run `command`; a run that does not end within PROMPTLY seconds fails the test (and is killed)."""
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=PROMPTLY)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {PROMPTLY} s: {' '.join(command)}")


def assert_one_line_error(result, needle: str, code: int = 2) -> None:
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("effconv: error: ") and needle in lines[0], result.stderr


def checkpoint_with_shard(fixture_ckpt: Path, folder: Path, make_shard) -> Path:
    folder.mkdir()
    (folder / "model.ckpt.index").symlink_to(fixture_ckpt / "model.ckpt.index")
    make_shard(folder / DATA)
    return folder


# --- special files as data shards --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_shard",
    [os.mkfifo, lambda path: path.symlink_to("/dev/zero")],
    ids=["named pipe", "link to /dev/zero"],
)
def test_special_file_as_shard_ends_the_process(fixture_ckpt, tmp_path, make_shard):
    src = checkpoint_with_shard(fixture_ckpt, tmp_path / "ckpt", make_shard)
    (tmp_path / "out").mkdir()
    result = run_promptly(cli("convert", "--src", src, "--out", tmp_path / "out" / "b0.pth", "-q"))
    assert_one_line_error(result, "is not a regular file")
    assert list((tmp_path / "out").iterdir()) == []


def test_sha256_refuses_special_files_without_blocking(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    code = (
        "import sys; from effconv.output.hashing import sha256_file; from effconv.errors import CheckpointError\n"
        "for path in sys.argv[1:]:\n"
        "    try: sha256_file(path)\n"
        "    except CheckpointError as e: print(e)\n"
    )
    result = run_promptly([sys.executable, "-c", code, str(fifo), "/dev/zero"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"{fifo} is not a regular file; only regular files are hashed",
        "/dev/zero is not a regular file; only regular files are hashed",
    ]


# --- compression bombs ----------------------------------------------------------------------------------


def gzip_bomb(path: Path, member_bytes: int, members: int, block: int = 64 << 20) -> Path:
    """A .tar.gz whose members hold `member_bytes` zeros each, in a file a thousand times smaller.

    One gzip member of `block` zeros, compressed once and repeated (gzip readers join members): cheap
    to write, as slow to read through as the real thing.
    """
    assert member_bytes % block == 0
    zeros = gzip.compress(bytes(block), compresslevel=9, mtime=0)
    with open(path, "wb") as out:
        for i in range(members):
            name = DATA if i == 0 else f"junk-{i}.bin"
            info = tarfile.TarInfo(f"efficientnet-b0/{name}")
            info.size = member_bytes
            out.write(gzip.compress(info.tobuf(format=tarfile.GNU_FORMAT), mtime=0))
            for _ in range(member_bytes // block):
                out.write(zeros)
        index = tarfile.TarInfo("efficientnet-b0/model.ckpt.index")
        out.write(gzip.compress(index.tobuf(format=tarfile.GNU_FORMAT) + bytes(1024), mtime=0))
    return path


def test_compression_bomb_is_refused_at_its_header(tmp_path):
    """40 GiB of zeros declared in a 41 MB file: refused at once, not after reading 40 GiB."""
    bomb = gzip_bomb(tmp_path / "bomb.tar.gz", member_bytes=40 << 30, members=1)
    assert bomb.stat().st_size < 50e6
    (tmp_path / "out").mkdir()
    start = time.monotonic()
    result = run_promptly(cli("convert", "--src", bomb, "--out", tmp_path / "out" / "b0.pth", "-q"))
    assert_one_line_error(result, f"would extract to {40 << 30} bytes or more (the sizes its members declare, up to")
    assert f"'efficientnet-b0/{DATA}'), over the" in result.stderr
    assert time.monotonic() - start < PROMPTLY / 2
    assert list((tmp_path / "out").iterdir()) == []


def test_bomb_of_many_members_stops_at_the_limit(tmp_path):
    """Members each under the limit: refused at the header that takes the declared total past it."""
    bomb = gzip_bomb(tmp_path / "bomb.tar.gz", member_bytes=64 << 20, members=200)  # 12.5 GiB in all
    (tmp_path / "dest").mkdir()
    start = time.monotonic()
    with pytest.raises(CheckpointError, match=f"would extract to {3 * (64 << 20)} bytes or more .*junk-2.bin"):
        extract_checkpoint(bomb, tmp_path / "dest", max_bytes=150 << 20)
    assert time.monotonic() - start < 10  # two members read through, not two hundred
    assert list((tmp_path / "dest").iterdir()) == []


# --- values and bytes -------------------------------------------------------------------------------------


def test_nonfinite_weights_are_refused_naming_the_tensor(fixture_ckpt, tmp_path):
    stem = read_tensor(fixture_ckpt, STEM_EMA)
    stem.flat[[3, 7]] = [np.nan, np.inf]
    src = with_values(fixture_ckpt, tmp_path / "ckpt", {STEM_EMA: stem})
    out = tmp_path / "b0.pth"
    result = run_cli("convert", "--src", src, "--out", out, "--variant", "standard", "-q")
    assert result.exit_code == 2, result.output
    assert f"tensor '{STEM_EMA}'" in result.stderr and "2 non-finite values" in result.stderr
    assert "--allow-nonfinite" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # nothing written


def test_allow_nonfinite_keeps_them_and_the_card_says_so(fixture_ckpt, tmp_path):
    bias = read_tensor(fixture_ckpt, HEAD_BIAS_EMA)
    bias[5] = -np.inf
    src = with_values(fixture_ckpt, tmp_path / "ckpt", {HEAD_BIAS_EMA: bias})
    out = tmp_path / "b0.pth"
    result = run_cli("convert", "--src", src, "--out", out, "--variant", "standard", "-q", "--allow-nonfinite")
    assert result.exit_code == 0, result.output
    assert "NaN or Inf" in result.stderr and HEAD_BIAS_EMA in result.stderr  # a warning, still
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["nonfinite"] == {HEAD_BIAS_EMA: 1}
    weights = torch.load(out, weights_only=True)
    assert torch.isneginf(weights["classifier.bias"][5])


def test_a_flipped_byte_in_an_unused_tensor_is_caught(fixture_ckpt, tmp_path):
    """The raw stem kernel is not converted (the EMA copy is); its crc32c is checked all the same."""
    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "model.ckpt.index").symlink_to(fixture_ckpt / "model.ckpt.index")
    data = bytearray((fixture_ckpt / DATA).read_bytes())
    with TensorBundleReader(fixture_ckpt / "model.ckpt") as reader:
        data[reader.info(STEM).offset + 5] ^= 0x10
    (src / DATA).write_bytes(bytes(data))
    result = run_cli("convert", "--src", src, "--out", tmp_path / "b0.pth", "--variant", "standard", "-q")
    assert result.exit_code == 2, result.output
    assert f"crc32c mismatch in tensor '{STEM}'" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_every_tensor_checked_is_counted_in_the_card(fixture_ckpt, tmp_path):
    out = tmp_path / "b0.pth"
    assert run_cli("convert", "--src", fixture_ckpt, "--out", out, "--variant", "standard", "-q").exit_code == 0
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["source"]["crc32c_checked"] == card["source"]["variables"] == 623
    assert card["mapped"] < card["source"]["variables"] and "nonfinite" not in card


# --- two writers, one output ------------------------------------------------------------------------------


def test_second_writer_to_the_same_output_fails_and_leaves_the_first(tmp_path):
    """Both pass the early check (neither has committed yet); the second commit finds the name taken."""
    out = tmp_path / "b0.pth"
    first, second = ArtifactWriter(out), ArtifactWriter(out)
    for writer, value in ((first, 1.0), (second, 2.0)):
        writer.add("w", torch.full((3,), value))
    first.commit({"arch": "b0", "num_classes": 3, "writer": "first"})
    with pytest.raises(UsageError, match=f"output exists: {out}"):
        with second:
            second.commit({"arch": "b0", "num_classes": 3, "writer": "second"})
    assert json.loads(out.with_suffix(".json").read_text())["writer"] == "first"
    assert torch.equal(torch.load(out, weights_only=True)["w"], torch.full((3,), 1.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b0.json", "b0.pth"]  # no temporary left


def test_second_writer_fails_when_only_the_card_name_is_taken(tmp_path):
    out = tmp_path / "b0.pth"
    writer = ArtifactWriter(out)
    writer.add("w", torch.zeros(2))
    out.with_suffix(".json").write_text('{"someone": "else"}\n')  # appeared after the early check
    with pytest.raises(UsageError, match="output exists: .*b0.json"):
        with writer:
            writer.commit({"arch": "b0", "num_classes": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b0.json"]  # the weights it had placed are gone
    assert out.with_suffix(".json").read_text() == '{"someone": "else"}\n'


def test_two_conversions_started_together(fixture_ckpt, tmp_path):
    out = tmp_path / "b0.pth"
    command = cli("convert", "--src", fixture_ckpt, "--out", out, "--variant", "standard", "-q")
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert loser.startswith(f"effconv: error: output exists: {out}"), loser
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b0.json", "b0.pth"]
    assert json.loads(out.with_suffix(".json").read_text())["arch"] == "b0"


def test_gzip_bomb_helper_is_what_it_claims(tmp_path):
    """The control: the bomb really holds what its headers declare (checked on a small one)."""
    bomb = gzip_bomb(tmp_path / "small.tar.gz", member_bytes=1 << 20, members=2, block=1 << 20)
    with tarfile.open(bomb) as tar:
        sizes = {m.name: m.size for m in tar}
        assert tar.extractfile(f"efficientnet-b0/{DATA}").read() == bytes(1 << 20)
    assert sizes[f"efficientnet-b0/{DATA}"] == 1 << 20 and sizes["efficientnet-b0/junk-1.bin"] == 1 << 20
