"""Fuzzing the readers of untrusted files: checkpoints, tarballs and Keras .h5, mutated, truncated, spliced.

Sources are real: the official-b0 fixture, small checkpoints TensorFlow writes (every dtype, strings,
a partitioned tensor, two shards) and one written by our own test writer; indexes are also generated
field by field. Whatever the bytes, opening, listing, `info` and reading every tensor must end in
correct tensors or an `EffconvError` with a one-line message naming the checkpoint: never another
exception, a hang (a watchdog per case) or memory out of proportion to the files (tracemalloc).

Hypothesis runs derandomized (a fixed seed, no example database) with bounded examples per test:
2,950 checkpoint cases, 550 tarballs and (seeded, in a worker process) 405 .h5 files. The checkpoints
and tarballs take about 25 s; the .h5 files about 70 s, nearly all of it the reader's checking child
process (one per file opened, about 0.15 s).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import tempfile
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from effconv.errors import CheckpointError, EffconvError
from effconv.formats.bundle import TensorBundleReader, mask_crc32c
from effconv.formats.checkpoint_files import resolve_checkpoint
from tests.unit.test_bundle import header_proto, pb_bytes, pb_varint, save_v2, varint, write_handmade, write_index

CASE_SECONDS = 10  # the watchdog: no single case may take longer (a real one takes milliseconds)


def fuzz(examples: int):
    """A fixed seed and a bounded number of cases; a slow case fails on its own deadline."""
    return settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=3000,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=False,
    )


# --- the verdict on one case ---------------------------------------------------------------


class Hang(Exception):
    """Raised by the watchdog; not an EffconvError, so it fails the case."""


@contextlib.contextmanager
def bounded(max_bytes: int):
    """Fail the case if it outlives the watchdog or allocates more than `max_bytes` at once."""

    def expire(signum, frame):
        raise Hang(f"no answer within {CASE_SECONDS} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
    tracemalloc.start()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak <= max_bytes, f"peak allocation {peak} bytes for files of {max_bytes} bytes' budget"


def memory_budget(prefix: Path) -> int:
    """What reading may hold at once: the index many times over (parsed names), the data a few times."""
    index = Path(f"{prefix}.index")
    index_bytes = index.stat().st_size if index.exists() else 0
    data = sum(p.stat().st_size for p in prefix.parent.glob(prefix.name + ".data-*"))
    return 64 * index_bytes + 3 * data + (4 << 20)


def assert_clear(error: EffconvError, prefix: Path) -> None:
    message = str(error)
    assert message and "\n" not in message, repr(message)
    assert prefix.name in message, f"the message does not name the checkpoint: {message}"


def as_bytes(array: np.ndarray) -> np.ndarray:
    return array.reshape(-1).view(np.uint8)


def check_read_everything(prefix: Path, known: dict[str, np.ndarray] | None = None) -> list[EffconvError]:
    """Open, list, `info` and read every tensor; returns the (checked) errors.

    Every array that comes back must be exactly the bytes its index entry points at, with the
    entry's dtype and shape, and, when `known` is given (the file was not re-checksummed after a
    mutation), identical to the tensor of that name in the original checkpoint.
    """
    errors: list[EffconvError] = []
    with bounded(memory_budget(prefix)):
        try:
            with TensorBundleReader(prefix) as reader:
                names = reader.keys()
                assert len(set(names)) == len(names) == len(reader)
                assert reader.nbytes >= 0
                for info in [reader.info(name) for name in names]:
                    assert info.nbytes >= 0 and info.crc32c >= 0
                    try:
                        array = reader.read(info.name)
                    except CheckpointError as e:
                        errors.append(e)
                        continue
                    assert array.dtype == info.dtype and array.shape == info.shape and array.nbytes == info.size
                    assert google_crc32c.value(as_bytes(array)) == info.crc32c
                    if known is not None:
                        expected = known[info.name]
                        assert array.dtype == expected.dtype and array.shape == expected.shape, info.name
                        assert np.array_equal(as_bytes(array), as_bytes(expected)), info.name
                    else:
                        with open(reader.shard_paths[info.shard], "rb") as f:
                            assert bytes(as_bytes(array)) == os.pread(f.fileno(), info.size, info.offset), info.name
        except EffconvError as e:
            errors.append(e)
    for error in errors:
        assert_clear(error, prefix)
    return errors


# --- the checkpoints to start from -------------------------------------------------------------


@dataclass(repr=False)
class Source:
    """One checkpoint as bytes: its index and data shards, and what reading it must give."""

    name: str
    original: Path  # the prefix of the untouched files
    index: bytes
    shards: list[bytes]
    known: dict[str, np.ndarray]

    def __repr__(self) -> str:
        return f"Source({self.name})"

    def write(self, prefix: Path, index: bytes | None = None, shards: list[bytes] | None = None) -> Path:
        """A copy at `prefix` with the index and/or shards replaced (untouched shards are links)."""
        prefix.parent.mkdir(parents=True, exist_ok=True)
        for old in prefix.parent.glob(prefix.name + ".*"):
            old.unlink()
        Path(f"{prefix}.index").write_bytes(self.index if index is None else index)
        count = len(self.shards if shards is None else shards)
        for i in range(count):
            path = Path(f"{prefix}.data-{i:05d}-of-{count:05d}")
            if shards is None:
                path.symlink_to(Path(f"{self.original}.data-{i:05d}-of-{count:05d}"))
            else:
                path.write_bytes(shards[i])
        return prefix


def load_source(name: str, prefix: Path) -> Source:
    index = Path(f"{prefix}.index").read_bytes()
    shards = [p.read_bytes() for p in sorted(prefix.parent.glob(prefix.name + ".data-*"))]
    with TensorBundleReader(prefix) as reader:
        known = {info.name: reader.read(info.name) for info in reader.infos() if not info.unsupported}
    return Source(name, prefix, index, shards, known)


@pytest.fixture(scope="module")
def sources(fixture_ckpt, tmp_path_factory) -> dict[str, Source]:
    import tensorflow as tf  # writes the synthetic checkpoints in TF's own format

    root = tmp_path_factory.mktemp("fuzz-sources")
    rng = np.random.default_rng(6)
    dtypes = {
        "a/float32": tf.constant(rng.standard_normal((3, 4)).astype(np.float32)),
        "b/float16": tf.constant(np.arange(6, dtype=np.float16).reshape(2, 3)),
        "c/float64": tf.constant(np.float64(np.e)),
        "d/int8": tf.constant(np.array([-128, 5, 127], np.int8)),
        "e/int64": tf.constant(np.int64(1000)),
        "f/bool": tf.constant([True, False, True]),
        "g/bfloat16": tf.constant([1.5, -2.0], tf.bfloat16),
        "h/empty": tf.zeros((0, 3)),
        "i/names": tf.constant([b"block", b"se"]),
        "j/part": tf.ones([2, 2]),
        "k/uint16": tf.constant(np.array([1, 65535], np.uint16)),
    }
    save_v2(tf, root / "dtypes" / "model.ckpt", dtypes, slices={"j/part": "4 2 0,2:-"})
    parts = []
    for i in range(2):
        part = root / "parts" / f"part-{i}"
        save_v2(tf, part, {f"layer{i}/kernel": tf.constant(rng.standard_normal((5, 2)).astype(np.float32))})
        parts.append(str(part))
    tf.raw_ops.MergeV2Checkpoints(checkpoint_prefixes=parts, destination_prefix=str(root / "sharded" / "model.ckpt"))
    (root / "handmade").mkdir()
    write_handmade(root / "handmade" / "model.ckpt", {"x": np.arange(12, dtype=np.float32), "y": np.float32(2)})
    return {
        "fixture": load_source("fixture", fixture_ckpt / "model.ckpt"),
        **{name: load_source(name, root / name / "model.ckpt") for name in ("dtypes", "sharded", "handmade")},
    }


@pytest.fixture(scope="module")
def small(sources) -> dict[str, Source]:
    return {k: v for k, v in sources.items() if k != "fixture"}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz-work")


def test_sources_read_cleanly(sources, work):
    """The oracle itself: untouched sources read without error, but for what `dtypes` holds on purpose."""
    for source in sources.values():
        errors = check_read_everything(source.write(work / source.name / "model.ckpt"), source.known)
        expected = ["unsupported dtype string", "unsupported partitioned"] if source.name == "dtypes" else []
        assert [str(e)[: len(m)] for e, m in zip(errors, expected, strict=True)] == expected
    assert len(sources["fixture"].known) == 623


# --- byte-level edits ---------------------------------------------------------------------------

INTERESTING = (0x00, 0x01, 0x7F, 0x80, 0xFF)
EDITS = st.lists(
    st.tuples(
        st.sampled_from(["flip", "set", "interesting", "insert", "delete", "duplicate"]),
        st.integers(0, 2**31),  # where, taken modulo the region
        st.integers(0, 255),
        st.integers(1, 48),  # how many bytes an insert, delete or duplicate touches
    ),
    min_size=1,
    max_size=6,
)
IN_PLACE_EDITS = st.lists(
    st.tuples(st.sampled_from(["flip", "set", "interesting", "varint"]), st.integers(0, 2**31), st.integers(0, 2**64)),
    min_size=1,
    max_size=4,
)


def apply_edits(buf: bytes, edits, start: int = 0, end: int | None = None) -> bytes:
    out = bytearray(buf)
    for kind, where, value, length in edits:
        stop = len(out) if end is None else min(end, len(out))
        if stop <= start:
            break
        pos = start + where % (stop - start)
        if kind == "flip":
            out[pos] ^= 1 << (value % 8)
        elif kind == "set":
            out[pos] = value
        elif kind == "interesting":
            out[pos] = INTERESTING[value % len(INTERESTING)]
        elif kind == "insert":
            out[pos:pos] = bytes([value]) * length
        elif kind == "delete":
            del out[pos : pos + length]
        else:
            out[pos:pos] = out[pos : pos + length]
    return bytes(out)


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos


def block_entries(block: bytes) -> list[bytes]:
    """The values of a well-formed block (keys are not needed here)."""
    (restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    limit, pos, values = len(block) - 4 - 4 * restarts, 0, []
    while pos < limit:
        (_, unshared, value_len), pos = _varints(block, pos, 3)
        values.append(block[pos + unshared : pos + unshared + value_len])
        pos += unshared + value_len
    return values


def _varints(buf: bytes, pos: int, count: int) -> tuple[list[int], int]:
    values = []
    for _ in range(count):
        value, pos = read_varint(buf, pos)
        values.append(value)
    return values, pos


def table_blocks(index: bytes) -> list[tuple[int, int]]:
    """(offset, size) of every block of a well-formed index: data blocks, then the index block."""
    (_, _, index_offset, index_size), _ = _varints(index, len(index) - 48, 4)
    handles = block_entries(index[index_offset : index_offset + index_size])
    return [tuple(_varints(h, 0, 2)[0]) for h in handles] + [(index_offset, index_size)]


def fix_block_crc(buf: bytearray, offset: int, size: int) -> None:
    crc = mask_crc32c(google_crc32c.value(bytes(buf[offset : offset + size + 1])))
    buf[offset + size + 1 : offset + size + 5] = struct.pack("<I", crc)


REGIONS = ("anywhere", "footer", "index block", "data block", "trailer")


def region_of(index: bytes, kind: str, which: int) -> tuple[int, int]:
    blocks = table_blocks(index)
    if kind == "footer":
        return len(index) - 48, len(index)
    if kind == "index block":
        offset, size = blocks[-1]
        return offset, offset + size
    if kind == "data block":
        offset, size = blocks[which % (len(blocks) - 1)]
        return offset, offset + size
    if kind == "trailer":
        offset, size = blocks[which % len(blocks)]
        return offset + size, offset + size + 5
    return 0, len(index)


# --- the index: mutated, re-checksummed, truncated, spliced -------------------------------------


@fuzz(700)
@given(name=st.sampled_from(["fixture", "dtypes", "sharded", "handmade"]), region=st.sampled_from(REGIONS),
       which=st.integers(0, 1000), edits=EDITS)  # fmt: skip
def test_mutated_index(sources, work, name, region, which, edits):
    source = sources[name]
    start, end = region_of(source.index, region, which)
    prefix = source.write(work / "mutated" / "model.ckpt", index=apply_edits(source.index, edits, start, end))
    check_read_everything(prefix, source.known)


def overwrite(buf: bytearray, kind: str, pos: int, value: int) -> None:
    if kind == "flip":
        buf[pos] ^= 1 << (value % 8)
    elif kind == "set":
        buf[pos] = value % 256
    elif kind == "interesting":
        buf[pos] = INTERESTING[value % len(INTERESTING)]
    else:  # a varint over the bytes there: lengths, offsets, field values out of range
        encoded = varint(value)[: len(buf) - pos]
        buf[pos : pos + len(encoded)] = encoded


@fuzz(700)
@given(name=st.sampled_from(["fixture", "dtypes", "sharded", "handmade"]), which=st.integers(0, 1000),
       edits=IN_PLACE_EDITS, compression=st.sampled_from([None, None, None, 1, 2, 255]))  # fmt: skip
def test_mutated_block_with_valid_crc(sources, work, name, which, edits, compression):
    """Edits inside one block whose crc is then recomputed, so the parser meets them."""
    source = sources[name]
    blocks = table_blocks(source.index)
    offset, size = blocks[which % len(blocks)]
    index = bytearray(source.index)
    for kind, where, value in edits:
        overwrite(index, kind, offset + where % size, value)
    if compression is not None:
        index[offset + size] = compression
    fix_block_crc(index, offset, size)
    prefix = source.write(work / "recrc" / "model.ckpt", index=bytes(index))
    check_read_everything(prefix)


@fuzz(250)
@given(name=st.sampled_from(["fixture", "dtypes", "sharded", "handmade"]), keep=st.floats(0, 1), tail=st.booleans())
def test_truncated_index(sources, work, name, keep, tail):
    source = sources[name]
    cut = int(len(source.index) * keep)
    index = source.index[cut:] if tail else source.index[:cut]
    prefix = source.write(work / "truncated" / "model.ckpt", index=index)
    errors = check_read_everything(prefix, source.known)
    assert errors or index == source.index


@fuzz(250)
@given(first=st.sampled_from(["fixture", "dtypes", "sharded", "handmade"]),
       second=st.sampled_from(["fixture", "dtypes", "sharded", "handmade"]),
       split=st.tuples(st.floats(0, 1), st.floats(0, 1)), data_from_second=st.booleans())  # fmt: skip
def test_spliced_index_and_data(sources, work, first, second, split, data_from_second):
    a, b = sources[first], sources[second]
    index = a.index[: int(len(a.index) * split[0])] + b.index[int(len(b.index) * split[1]) :]
    prefix = (b if data_from_second else a).write(work / "spliced" / "model.ckpt", index=index)
    check_read_everything(prefix, {**a.known, **b.known} if first == second else None)


# --- the data shards ----------------------------------------------------------------------------


@fuzz(250)
@given(name=st.sampled_from(["fixture"] + ["dtypes", "sharded", "handmade"] * 3),
       shard=st.integers(0, 1), edits=st.one_of(EDITS, st.just([])),
       cut=st.one_of(st.none(), st.floats(0, 1)), extra=st.binary(max_size=64))  # fmt: skip
def test_mutated_data(sources, work, name, shard, edits, cut, extra):
    """Flipped, inserted, deleted, truncated or appended bytes in one shard: every returned tensor is the original."""
    source = sources[name]
    shards = list(source.shards)
    i = shard % len(shards)
    data = apply_edits(shards[i], edits) if edits and shards[i] else shards[i]
    if cut is not None:
        data = data[: int(len(data) * cut)]
    shards[i] = data + extra
    check_read_everything(source.write(work / "data" / "model.ckpt", shards=shards), source.known)


# --- indexes generated field by field -----------------------------------------------------------

BIG = [2**31 - 1, 2**31, 2**32, 2**53, 2**62, 2**63 - 1, 2**63, 2**64 - 1, -1, -(2**63)]
NUMBER = st.one_of(st.integers(0, 8), st.sampled_from(BIG), st.integers(-(2**64), 2**65))


ITEMSIZE = {1: 4, 2: 8, 3: 4, 4: 1, 5: 2, 6: 1, 8: 8, 9: 8, 10: 1, 14: 2, 17: 2, 18: 16, 19: 2, 22: 4, 23: 8}
# At most one of these per generated checkpoint, so that each gets a fair share of cases.
ODDITIES = (
    *("dtype", "rank", "dims", "offset", "size", "shard", "crc", "unknown rank", "sliced", "wire type"),
    *("num_shards", "endianness", "min_consumer", "binary name", "unsorted", "no header", "header last"),
)


@st.composite
def entry_proto(draw, data: bytes, oddity: str | None) -> bytes:
    """A BundleEntryProto, sane but for `oddity`; half the sizes agree with dtype and shape."""
    dtype = draw(NUMBER if oddity == "dtype" else st.sampled_from([*ITEMSIZE, 0, 7, 20, 21, 24]))
    rank = draw(st.sampled_from([33, 65, 300]) if oddity == "rank" else st.integers(0, 3))
    dim = NUMBER if oddity == "dims" else st.integers(0, 4)
    dims = [draw(dim) for _ in range(min(rank, 6))]
    dims += [draw(st.integers(0, 1))] * (rank - len(dims))  # high ranks: ones, or zeros (an empty tensor)
    consistent = math.prod(dims) * ITEMSIZE.get(dtype, 1)
    offset = draw(NUMBER if oddity == "offset" else st.integers(0, len(data) + 2))
    size = draw(NUMBER if oddity == "size" else st.one_of(st.just(consistent), st.integers(0, len(data) + 2)))
    shard = draw(NUMBER) if oddity == "shard" else 0
    shape = b"".join(pb_bytes(2, pb_varint(1, d)) for d in dims)
    if oddity == "unknown rank":
        shape += pb_varint(3, 1)
    piece = data[offset : offset + size] if 0 <= offset <= len(data) and 0 <= size else b""
    crc = draw(st.integers(0, 2**32 - 1)) if oddity == "crc" else mask_crc32c(google_crc32c.value(piece))
    fields = [
        pb_varint(1, dtype),
        pb_bytes(2, shape),
        pb_varint(3, shard),
        pb_varint(4, offset),
        pb_varint(5, size),
        varint(6 << 3 | 5) + struct.pack("<I", crc),
    ]
    if oddity == "sliced":
        fields.append(pb_bytes(7, b""))  # a slice list: a partitioned tensor
    if oddity == "wire type":  # wrong wire types, unknown fields, truncation, group markers
        fields.insert(draw(st.integers(0, len(fields))), draw(st.sampled_from(
            [pb_bytes(1, b"x"), pb_varint(2, 3), varint(3 << 3 | 1) + b"\0" * 8, pb_varint(99, 7), b"\x0b", b"\x80"]
        )))  # fmt: skip
    return b"".join(fields)


@st.composite
def generated_checkpoint(draw) -> tuple[list[tuple[bytes, bytes]], bytes]:
    oddity = draw(st.sampled_from((None,) * 4 + ODDITIES))
    data = draw(st.binary(max_size=256))
    header = header_proto(
        num_shards=draw(NUMBER) if oddity == "num_shards" else 1,
        endianness=draw(st.sampled_from([1, 7])) if oddity == "endianness" else 0,
        min_consumer=draw(st.sampled_from([1, 2])) if oddity == "min_consumer" else 0,
    )
    name = st.binary(min_size=1, max_size=8) if oddity == "binary name" else st.text("ab/_0", min_size=1, max_size=8)
    names = [n if isinstance(n, bytes) else n.encode() for n in draw(st.lists(name, min_size=1, max_size=4))]
    if oddity != "unsorted":
        names = sorted(set(names))  # in order, as the format requires
    items = [(name, draw(entry_proto(data, oddity))) for name in names]
    if oddity != "no header":
        items.insert(len(items) if oddity == "header last" else 0, (b"", header))
    return items, data


@fuzz(800)
@given(checkpoint=generated_checkpoint())
def test_generated_index(work, checkpoint):
    items, data = checkpoint
    prefix = work / "generated" / "model.ckpt"
    prefix.parent.mkdir(exist_ok=True)
    write_index(Path(f"{prefix}.index"), items)
    Path(f"{prefix}.data-00000-of-00001").write_bytes(data)
    check_read_everything(prefix)


# --- tarballs -----------------------------------------------------------------------------------

MAX_EXTRACT = 1 << 16


def tar_header(name: str, size: int, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname = size, kind, linkname
    return info.tobuf(tarfile.GNU_FORMAT)


def tar_bytes(members: list[tuple[str, bytes, bytes, str, int | None]]) -> bytes:
    """A tar built by hand, so that a header may claim more bytes than follow."""
    out = bytearray()
    for name, kind, content, linkname, claimed in members:
        out += tar_header(name, len(content) if claimed is None else claimed, kind, linkname)
        if kind == tarfile.REGTYPE:
            out += content + b"\0" * (-len(content) % 512)
    return bytes(out + b"\0" * 1024)


@st.composite
def tar_members(draw, source: Source, escape: Path):
    folder = draw(st.sampled_from(["ckpt", "a/b", ".", "./ckpt", "..", "../ckpt", "ckpt/../..", str(escape), "c\\.."]))
    names = st.sampled_from([
        f"{folder}/model.ckpt.index", f"{folder}/model.ckpt.data-00000-of-00001", f"{folder}/checkpoint",
        "../model.ckpt.index", f"{folder}/../../model.ckpt.data-00000-of-00001", f"{escape}/model.ckpt.index",
        f"{folder}\\..\\model.ckpt.index", f"{folder}/model.ckpt.data-00001-of-00002", "other/model.ckpt.index",
        "model.ckpt.index", f"{folder}/model.ckpt.meta",
    ])  # fmt: skip
    contents = st.sampled_from([
        source.index, source.shards[0], source.index[:100], b"", b'model_checkpoint_path: "model.ckpt"\n',
        b"\0" * 600, b"\0" * (MAX_EXTRACT + 1),
    ])  # fmt: skip
    kinds = st.sampled_from([tarfile.REGTYPE] * 6 + [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE,
                                                     tarfile.FIFOTYPE, tarfile.CHRTYPE])  # fmt: skip
    links = st.sampled_from(["/etc/passwd", "../../outside", f"{escape}/x", "model.ckpt.index", f"{folder}/x"])
    members = [
        (f"{folder}/model.ckpt.index", tarfile.REGTYPE, source.index, "", None),
        (f"{folder}/model.ckpt.data-00000-of-00001", tarfile.REGTYPE, source.shards[0], "", None),
    ]
    for _ in range(draw(st.integers(0, 3))):
        claimed = draw(st.sampled_from([None] * 20 + [MAX_EXTRACT + 1, 2**33, 2**40]))
        member = (draw(names), draw(kinds), draw(contents), draw(links), claimed)
        action, i = draw(st.sampled_from(["add", "retype", "rename", "drop"])), draw(st.integers(0, len(members)))
        if action == "add" or i == len(members):
            members.insert(i, member)
        elif action == "retype":  # the same name, as a link, a device, other bytes, a lying size
            members[i] = (members[i][0], *member[1:])
        elif action == "rename":
            members[i] = (member[0], *members[i][1:])
        else:
            del members[i]
    return members


@contextlib.contextmanager
def temporary_folders_in(folder: Path):
    """Make `tempfile` create its folders in `folder`, so that what is left there is ours alone."""
    previous, tempfile.tempdir = tempfile.tempdir, str(folder)
    try:
        yield
    finally:
        tempfile.tempdir = previous


def check_tarball(tarball: Path, source: Source, escape: Path, scratch: Path) -> None:
    """Extraction gives a checkpoint whose tensors are right, or a clear error; nothing lands elsewhere."""
    try:
        with temporary_folders_in(scratch), bounded(64 * tarball.stat().st_size + (16 << 20)), \
                resolve_checkpoint(tarball, max_extract_bytes=MAX_EXTRACT) as files:  # fmt: skip
            temporary = files.prefix.parent
            assert temporary.parent == scratch and temporary.name.startswith("effconv-")
            for path in temporary.iterdir():
                assert path.is_file() and not path.is_symlink(), path
            assert sum(p.stat().st_size for p in temporary.iterdir()) <= MAX_EXTRACT
            check_read_everything(files.prefix, source.known)
        assert not temporary.exists()
    except EffconvError as e:
        message = str(e)
        assert message and "\n" not in message and tarball.name in message, message
    assert not any(escape.iterdir()), list(escape.iterdir())
    assert sorted(p.name for p in tarball.parent.iterdir()) == [tarball.name, escape.name]
    assert not any(scratch.iterdir()), "an extraction folder was left"


@pytest.fixture(scope="module")
def tar_work(tmp_path_factory) -> tuple[Path, Path, Path]:
    """The folder of the tarball, a folder beside it that must stay empty, and a private temporary folder."""
    root = tmp_path_factory.mktemp("fuzz-tar")
    (root / "escape").mkdir()
    return root, root / "escape", tmp_path_factory.mktemp("fuzz-tar-scratch")


@fuzz(250)
@given(data=st.data(), gz=st.booleans())
def test_tarball_members(small, tar_work, data, gz):
    """Any mix of members: links, devices, paths leaving the folder, duplicates, sizes that lie."""
    root, escape, scratch = tar_work
    source = small["dtypes"]
    raw = tar_bytes(data.draw(tar_members(source, escape)))
    tarball = root / ("ckpt.tar.gz" if gz else "ckpt.tar")
    for old in root.glob("ckpt.tar*"):
        old.unlink()
    tarball.write_bytes(gzip.compress(raw, compresslevel=1, mtime=0) if gz else raw)
    check_tarball(tarball, source, escape, scratch)


@fuzz(300)
@given(gz=st.booleans(), edits=EDITS, cut=st.one_of(st.none(), st.floats(0, 1)))
def test_mutated_tarball(small, tar_work, gz, edits, cut):
    root, escape, scratch = tar_work
    source = small["handmade"]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, content in (("model.ckpt.index", source.index), ("model.ckpt.data-00000-of-00001", source.shards[0])):
            info = tarfile.TarInfo(f"efficientnet-b0/{name}")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    raw = gzip.compress(buf.getvalue(), compresslevel=1, mtime=0) if gz else buf.getvalue()
    raw = apply_edits(raw, edits)
    if cut is not None:
        raw = raw[: int(len(raw) * cut)]
    for old in root.glob("ckpt.tar*"):
        old.unlink()
    tarball = root / ("ckpt.tar.gz" if gz else "ckpt.tar")
    tarball.write_bytes(raw)
    check_tarball(tarball, source, escape, scratch)


@pytest.fixture(autouse=True)
def _clean_work(work):
    yield
    for path in work.glob("*"):
        shutil.rmtree(path, ignore_errors=True)


# --- Keras .h5 (effconv.formats.keras_h5) -----------------------------------------------------------------
# HDF5 is parsed by the C library behind h5py, which can take the whole process down on a corrupted
# file: each batch of cases runs in a worker process (address space capped at 2 GiB), restarted after
# a crash, and its cases are made by a seeded generator instead of hypothesis. HDF5 as Keras writes
# it has no checksums, so a flipped byte in a weight is read back silently: the oracle is only that
# every outcome is an array of the listed shape and dtype or an EffconvError.

H5_WORKER = r"""
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
from effconv.errors import EffconvError
from effconv.formats.keras_h5 import KerasH5Reader
for path in sys.argv[1:]:
    print(json.dumps({"case": path}), flush=True)
    try:
        with KerasH5Reader(path) as reader:
            for name in reader.keys():
                info = reader.info(name)
                array = reader.read(name)
                assert array.shape == info.shape and array.dtype == info.dtype, name
                if path.endswith("external-raw.h5") and b"SECRET" in array.tobytes():
                    raise AssertionError(f"{name} holds the bytes of a file outside the .h5")
            reader.model_config
        outcome, detail = "ok", ""
    except EffconvError as e:
        outcome, detail = "error", str(e)
    except BaseException as e:
        outcome, detail = "foreign", f"{type(e).__name__}: {e}"
    print(json.dumps({"case": path, "outcome": outcome, "detail": detail[:300]}), flush=True)
"""
H5_CASES = 400


def run_h5_cases(paths: list[Path], timeout: float = 600) -> dict[str, tuple[str, str]]:
    """{case: (outcome, detail)}: ok, error (an EffconvError), foreign (any other exception) or crash."""
    results: dict[str, tuple[str, str]] = {}
    todo = [str(p) for p in paths]
    while todo:
        proc = subprocess.run([sys.executable, "-c", H5_WORKER, *todo], capture_output=True, text=True, timeout=timeout)
        started = None
        for line in proc.stdout.splitlines():
            record = json.loads(line)
            if "outcome" in record:
                results[record["case"]] = (record["outcome"], record["detail"])
                started = None
            else:
                started = record["case"]
        if proc.returncode == 0:
            break
        assert started is not None, proc.stderr
        results[started] = ("crash", f"worker died with status {proc.returncode}")
        todo = todo[todo.index(started) + 1 :]
    return results


def mutate(original: bytes, rng: np.random.Generator) -> bytes:
    out = bytearray(original)
    for _ in range(rng.integers(1, 6)):
        kind, pos = rng.integers(0, 5), int(rng.integers(0, len(out)))
        if kind == 0:
            out[pos] ^= 1 << int(rng.integers(0, 8))
        elif kind == 1:
            out[pos] = int(rng.integers(0, 256))
        elif kind == 2:
            out[pos] = INTERESTING[int(rng.integers(0, len(INTERESTING)))]
        elif kind == 3:
            del out[pos:]
        else:
            out[pos : pos + 8] = int(rng.integers(0, 2**63)).to_bytes(8, "little")
        if not out:
            break
    return bytes(out)


@pytest.fixture(scope="module")
def keras_h5(tmp_path_factory) -> Path:
    """A small model saved by Keras as legacy HDF5, the layout effconv reads."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(4, 3, name="stem_conv"),
            keras.layers.BatchNormalization(name="stem_bn"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(5, name="predictions"),
        ]
    )
    path = tmp_path_factory.mktemp("keras") / "tiny.h5"
    model.save(path)
    return path


@pytest.fixture(scope="module")
def mutated_h5_results(keras_h5, tmp_path_factory) -> dict[str, tuple[str, str]]:
    root = tmp_path_factory.mktemp("h5-cases")
    rng = np.random.default_rng(20240606)  # fixed seed: the same cases on every run
    original = keras_h5.read_bytes()
    paths = []
    for i in range(H5_CASES):
        paths.append(root / f"case{i:04d}.h5")
        paths[-1].write_bytes(mutate(original, rng))
    # One case known to crash: the `layer_names` attribute's datatype made an invalid variable-length type.
    original = bytearray(original)
    where = re.search(rb"layer_names\x00+\x19", original)
    assert where, "the Keras file's layout changed: find another crashing byte"
    original[where.end()] = 0x6C
    paths.append(root / "known-crash.h5")
    paths[-1].write_bytes(bytes(original))
    results = run_h5_cases([keras_h5, *paths])
    assert results.pop(str(keras_h5)) == ("ok", "")  # the untouched file reads cleanly
    assert len(results) == H5_CASES + 1
    return results


def summary(results: dict[str, tuple[str, str]], outcome: str) -> list[str]:
    return [f"{Path(case).name}: {detail}" for case, (got, detail) in results.items() if got == outcome]


def test_mutated_h5_raises_only_our_errors(mutated_h5_results):
    assert summary(mutated_h5_results, "foreign") == []


def test_mutated_h5_never_crashes_the_process(mutated_h5_results):
    assert summary(mutated_h5_results, "crash") == []


def hostile_h5(original: Path, directory: Path, kind: str) -> Path:
    """A valid HDF5 file in Keras' layout whose `predictions` weights are made hostile."""
    import h5py

    path = directory / f"{kind}.h5"
    shutil.copy(original, path)
    with h5py.File(path, "r+") as f:
        # the kernel's group: `.../predictions/<model scope>/predictions`, the scope named by Keras's process-wide
        # counter (`sequential`, or `sequential_3` when other models were built before in this process)
        found: list[str] = []
        f["model_weights/predictions"].visititems(
            lambda name, obj: found.append(name) if name.endswith("kernel") else None
        )
        group = f["model_weights/predictions"][found[0].rpartition("/")[0]]
        del group["kernel"]
        if kind == "huge-chunked":  # declared 320 GiB, stores nothing: reading it allocates all of it
            group.create_dataset("kernel", shape=(2**34, 5), dtype="<f4", chunks=(1024, 5))
        elif kind == "external-raw":  # the weight's bytes live in another file on this machine
            secret = directory / "secret.bin"
            secret.write_bytes(b"SECRET" * 4 + b"\0" * 56)
            group.create_dataset("kernel", shape=(4, 5), dtype="<f4", external=[(str(secret), 0, 80)])
        elif kind == "external-link":  # the weight is a dataset of another .h5 file
            other = directory / "other.h5"
            with h5py.File(other, "w") as o:
                o["w"] = np.full((4, 5), 7, np.float32)
            group["kernel"] = h5py.ExternalLink(str(other), "/w")
        elif kind == "strings":
            group.create_dataset("kernel", data=np.array([["a"] * 5] * 4, dtype=h5py.string_dtype()))
    return path


@pytest.mark.parametrize("kind", ["huge-chunked", "external-raw", "external-link", "strings"])
def test_hostile_h5_structure_is_refused(keras_h5, tmp_path, kind):
    results = run_h5_cases([hostile_h5(keras_h5, tmp_path, kind)])
    assert [outcome for outcome, _ in results.values()] == ["error"], results
