"""TensorBundleReader against TensorFlow's own reader and writer, and against broken files."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import google_crc32c
import numpy as np
import pytest

from effconv.errors import CheckpointError, UsageError
from effconv.formats.bundle import BFLOAT16, TensorBundleReader, mask_crc32c, unmask_crc32c

TABLE_MAGIC = 0xDB4775248B80FB57


@pytest.fixture(scope="module")
def tf():
    import tensorflow  # a test dependency: missing it must fail, not skip

    return tensorflow


def save_v2(tf, prefix: Path, tensors: dict, slices: dict[str, str] | None = None) -> Path:
    names = list(tensors)
    specs = [(slices or {}).get(n, "") for n in names]
    tf.raw_ops.SaveV2(prefix=str(prefix), tensor_names=names, shape_and_slices=specs, tensors=list(tensors.values()))
    return prefix


def assert_identical(ours: np.ndarray, theirs: np.ndarray, name: str) -> None:
    assert ours.dtype == theirs.dtype, name
    assert ours.shape == theirs.shape, name
    assert ours.tobytes() == theirs.tobytes(), name


# --- a tiny independent writer, for index contents TF would never produce ---------


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def pb_varint(field: int, value: int) -> bytes:
    return varint(field << 3) + varint(value)


def pb_bytes(field: int, value: bytes) -> bytes:
    return varint(field << 3 | 2) + varint(len(value)) + value


def header_proto(num_shards: int = 1, endianness: int = 0, min_consumer: int = 0) -> bytes:
    version = pb_varint(1, 1) + (pb_varint(2, min_consumer) if min_consumer else b"")
    return pb_varint(1, num_shards) + pb_varint(2, endianness) + pb_bytes(3, version)


def entry_proto(
    array: np.ndarray, offset: int, dtype: int = 1, shard: int = 0, size: int | None = None, shape=None
) -> bytes:
    dims = b"".join(pb_bytes(2, pb_varint(1, d)) for d in (array.shape if shape is None else shape))
    crc = mask_crc32c(google_crc32c.value(array.tobytes()))
    return (
        pb_varint(1, dtype)
        + pb_bytes(2, dims)
        + pb_varint(3, shard)
        + pb_varint(4, offset)
        + pb_varint(5, array.nbytes if size is None else size)
        + varint(6 << 3 | 5)
        + struct.pack("<I", crc)
    )


def block(items: list[tuple[bytes, bytes]]) -> bytes:
    body = b"".join(varint(0) + varint(len(k)) + varint(len(v)) + k + v for k, v in items)
    return body + struct.pack("<II", 0, 1)  # one restart point, at 0


def write_index(path: Path, items: list[tuple[bytes, bytes]], compression: int = 0) -> None:
    out = bytearray()

    def add(contents: bytes) -> bytes:
        offset = len(out)
        trailer = bytes([compression])
        out.extend(contents + trailer + struct.pack("<I", mask_crc32c(google_crc32c.value(contents + trailer))))
        return varint(offset) + varint(len(contents))

    data_handle = add(block(items))
    meta_handle = add(block([]))
    index_handle = add(block([(b"\xff", data_handle)]))
    out.extend((meta_handle + index_handle).ljust(40, b"\0") + struct.pack("<Q", TABLE_MAGIC))
    path.write_bytes(bytes(out))


def write_handmade(prefix: Path, tensors: dict[str, np.ndarray], **header) -> Path:
    """A float32 bundle written without TensorFlow: one shard, tensors in the given key order."""
    items, data = [(b"", header_proto(**header))], bytearray()
    for name, array in tensors.items():
        items.append((name.encode(), entry_proto(array, len(data))))
        data.extend(array.tobytes())
    write_index(Path(f"{prefix}.index"), items)
    Path(f"{prefix}.data-00000-of-00001").write_bytes(bytes(data))
    return prefix


# --- ground truth -------------------------------------------------------------------


def test_fixture_matches_tensorflow_bit_for_bit(fixture_ckpt, tf):
    prefix = str(fixture_ckpt / "model.ckpt")
    theirs = tf.train.load_checkpoint(prefix)
    with TensorBundleReader(prefix) as reader:
        assert reader.keys() == [name for name, _ in tf.train.list_variables(prefix)]
        assert len(reader) == 623
        for name in reader:
            assert_identical(reader.read(name), theirs.get_tensor(name), name)
        assert reader.nbytes == (fixture_ckpt / "model.ckpt.data-00000-of-00001").stat().st_size


def test_fixture_listing_matches_variables_txt(fixture_dir):
    rows = [line.split("\t") for line in (fixture_dir / "variables.txt").read_text().splitlines()]
    reader = TensorBundleReader(fixture_dir / "ckpt" / "model.ckpt")
    assert reader.keys() == [name for name, _, _ in rows]
    for name, shape, dtype in rows:
        info = reader.info(name)
        assert list(info.shape) == json.loads(shape) and str(info.dtype) == dtype, name
    assert reader.info("global_step").shape == () and reader.read("global_step").dtype == np.int64


def test_dtypes_scalars_and_empty_tensors_round_trip(tmp_path, tf):
    arrays = {
        "a/float16": np.arange(-3, 3, dtype=np.float16).reshape(2, 3) / 7,
        "b/float32": np.random.default_rng(0).standard_normal((3, 1, 5)).astype(np.float32),
        "c/float64": np.float64(np.pi),
        "d/int8": np.array([-128, 0, 127], np.int8),
        "e/int16": np.array([-(2**15), 2**15 - 1], np.int16),
        "f/int32": np.array([[1, -2], [3, -(2**31)]], np.int32),
        "g/int64": np.int64(-(2**62)),
        "h/uint8": np.array([0, 255], np.uint8),
        "i/uint16": np.array([65535], np.uint16),
        "j/bool": np.array([True, False, True]),
        "k/empty": np.zeros((0, 4), np.float32),
        "l/empty_int": np.zeros((2, 0), np.int64),
        "m/complex64": np.array([1 + 2j], np.complex64),
    }
    tensors = {name: tf.constant(a) for name, a in arrays.items()}
    tensors["n/bfloat16"] = tf.constant([1.5, -2.25, 3.0e38, 0.0], tf.bfloat16)
    tensors["o/uint32"] = tf.constant([2**32 - 1], tf.uint32)
    tensors["p/uint64"] = tf.constant([2**64 - 1], tf.uint64)
    prefix = save_v2(tf, tmp_path / "model.ckpt", tensors)
    theirs = tf.train.load_checkpoint(str(prefix))
    with TensorBundleReader(prefix) as reader:
        assert reader.keys() == sorted(tensors)
        for name in reader:
            assert_identical(reader.read(name), theirs.get_tensor(name), name)
        for name, array in arrays.items():
            assert_identical(reader.read(name), np.asarray(array), name)
        assert reader.info("n/bfloat16").dtype == BFLOAT16 and reader.info("n/bfloat16").dtype_name == "bfloat16"
        assert reader.info("k/empty").nbytes == 0


def test_multi_shard_checkpoint(tmp_path, tf):
    parts = [str(tmp_path / "tmp" / f"part-{i:05d}-of-00002") for i in range(2)]
    expected = {}
    for i, part in enumerate(parts):
        arrays = {f"layer{i}/kernel": np.full((4, 3), i, np.float32), f"layer{i}/step": np.int64(10 + i)}
        save_v2(tf, Path(part), {k: tf.constant(v) for k, v in arrays.items()})
        expected.update(arrays)
    tf.raw_ops.MergeV2Checkpoints(checkpoint_prefixes=parts, destination_prefix=str(tmp_path / "model.ckpt"))
    assert (tmp_path / "model.ckpt.data-00001-of-00002").is_file()
    theirs = tf.train.load_checkpoint(str(tmp_path / "model.ckpt"))
    with TensorBundleReader(tmp_path / "model.ckpt") as reader:
        assert reader.num_shards == 2 and {reader.info(k).shard for k in reader} == {0, 1}
        assert reader.keys() == sorted(expected)
        for name, array in expected.items():
            assert_identical(reader.read(name), theirs.get_tensor(name), name)
            assert_identical(reader.read(name), np.asarray(array), name)


def test_string_and_sliced_tensors_are_listed_but_refused(tmp_path, tf):
    tensors = {"names": tf.constant([b"a", b"bc"]), "part": tf.ones([2, 2]), "whole": tf.ones([3])}
    prefix = save_v2(tf, tmp_path / "model.ckpt", tensors, slices={"part": "4 2 0,2:-"})
    reader = TensorBundleReader(prefix)
    assert reader.keys() == ["names", "part", "whole"]  # the slice's own key stays hidden
    assert reader.info("names").unsupported == "dtype string"
    with pytest.raises(CheckpointError, match="unsupported dtype string"):
        reader.read("names")
    with pytest.raises(CheckpointError, match=r"unsupported partitioned \(sliced\) tensor: tensor 'part'"):
        reader.read("part")
    np.testing.assert_array_equal(reader.read("whole"), np.ones(3, np.float32))


def test_handmade_index_reads_and_crc_is_masked(tmp_path):
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.float32(7)}
    reader = TensorBundleReader(write_handmade(tmp_path / "m", arrays))
    for name, array in arrays.items():
        assert_identical(reader.read(name), array, name)
        assert reader.info(name).crc32c == google_crc32c.value(array.tobytes())


def test_crc_mask_round_trip():
    for crc in (0, 1, 0x12345678, 0xFFFFFFFF):
        assert unmask_crc32c(mask_crc32c(crc)) == crc
    assert mask_crc32c(0) == 0xA282EAD8


# --- misuse and corruption ----------------------------------------------------------------


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory, tf) -> Path:
    prefix = tmp_path_factory.mktemp("small") / "model.ckpt"
    rng = np.random.default_rng(1)
    tensors = {f"v{i}": tf.constant(rng.standard_normal((8, 16)).astype(np.float32)) for i in range(3)}
    return save_v2(tf, prefix, tensors)


@pytest.fixture
def copy_of_small(small_ckpt, tmp_path) -> Path:
    for path in small_ckpt.parent.iterdir():
        shutil.copy(path, tmp_path / path.name)
    return tmp_path / small_ckpt.name


def data_file(prefix: Path) -> Path:
    return Path(f"{prefix}.data-00000-of-00001")


def index_file(prefix: Path) -> Path:
    return Path(f"{prefix}.index")


def test_unknown_name_and_closed_reader(small_ckpt):
    reader = TensorBundleReader(small_ckpt)
    assert "v1" in reader and "nope" not in reader
    with pytest.raises(CheckpointError, match="no tensor 'nope'"):
        reader.info("nope")
    with pytest.raises(CheckpointError, match="no tensor 'nope'"):
        reader.read("nope")
    reader.read("v0")
    reader.close()
    with pytest.raises(UsageError, match="closed"):
        reader.read("v0")


def test_flipped_data_byte_fails_crc(copy_of_small):
    reader = TensorBundleReader(copy_of_small)
    info = reader.info("v1")
    reader.close()
    raw = bytearray(data_file(copy_of_small).read_bytes())
    raw[info.offset + 5] ^= 0x40
    data_file(copy_of_small).write_bytes(bytes(raw))
    with TensorBundleReader(copy_of_small) as reader:
        reader.read("v0")
        with pytest.raises(CheckpointError, match=r"crc32c mismatch in tensor 'v1' of .*data-00000-of-00001"):
            reader.read("v1")
        assert reader.read("v1", verify=False).shape == (8, 16)


def test_truncated_data_file(copy_of_small):
    path = data_file(copy_of_small)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(CheckpointError, match=r"truncated data file .*data-00000-of-00001: tensor 'v2'"):
        TensorBundleReader(copy_of_small)


def test_missing_data_shard(copy_of_small):
    data_file(copy_of_small).unlink()
    with pytest.raises(CheckpointError, match="missing data shard .*data-00000-of-00001"):
        TensorBundleReader(copy_of_small)


def test_missing_index(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint index not found: .*nothing.index"):
        TensorBundleReader(tmp_path / "nothing")


@pytest.mark.parametrize("content", [b"", b"\0" * 10, np.random.default_rng(2).bytes(4096)], ids=len)
def test_garbage_index(copy_of_small, content):
    index_file(copy_of_small).write_bytes(content)
    with pytest.raises(CheckpointError, match="corrupted checkpoint index"):
        TensorBundleReader(copy_of_small)


def read_varints(buf: bytes, pos: int, count: int) -> tuple[list[int], int]:
    values = []
    for _ in range(count):
        value = shift = 0
        while True:
            byte = buf[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        values.append(value)
    return values, pos


def first_data_block(index: bytes) -> tuple[int, int]:
    """(offset, size) of the first data block, found through the footer and the index block."""
    (_, _, index_offset, _), _ = read_varints(index, len(index) - 48, 4)
    (_, key_len, _), pos = read_varints(index, index_offset, 3)
    (offset, size), _ = read_varints(index, pos + key_len, 2)
    return offset, size


def test_flipped_index_byte_fails_block_crc(copy_of_small):
    raw = bytearray(index_file(copy_of_small).read_bytes())
    raw[3] ^= 0x01  # inside the first data block
    index_file(copy_of_small).write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="crc32c mismatch in block at offset 0"):
        TensorBundleReader(copy_of_small)


def test_snappy_block_is_refused_cleanly(copy_of_small):
    raw = bytearray(index_file(copy_of_small).read_bytes())
    offset, size = first_data_block(bytes(raw))
    trailer = offset + size
    raw[trailer] = 1  # compression type: snappy, with a crc that matches it
    crc = mask_crc32c(google_crc32c.value(bytes(raw[offset : trailer + 1])))
    raw[trailer + 1 : trailer + 5] = struct.pack("<I", crc)
    index_file(copy_of_small).write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="snappy-compressed index blocks are not supported"):
        TensorBundleReader(copy_of_small)


def test_huge_block_handle_does_not_allocate(copy_of_small):
    raw = index_file(copy_of_small).read_bytes()
    footer = (varint(0) + varint(0) + varint(0) + varint(2**62)).ljust(40, b"\0") + struct.pack("<Q", TABLE_MAGIC)
    index_file(copy_of_small).write_bytes(raw[:-48] + footer)
    with pytest.raises(CheckpointError, match="runs past the end of the file"):
        TensorBundleReader(copy_of_small)


def test_handmade_snappy_flag(tmp_path):
    write_index(tmp_path / "m.index", [(b"", header_proto())], compression=1)
    with pytest.raises(CheckpointError, match="snappy"):
        TensorBundleReader(tmp_path / "m")


A = np.ones((2, 2), np.float32)


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([(b"", header_proto()), (b"x", entry_proto(A, 0)), (b"x", entry_proto(A, 0))], "duplicate tensor name 'x'"),
        ([(b"", header_proto()), (b"y", entry_proto(A, 0)), (b"x", entry_proto(A, 0))], "out of order"),
        ([(b"x", entry_proto(A, 0))], "no bundle header"),
        (
            [(b"", header_proto()), (b"x", entry_proto(A, 0, size=2**62, shape=(2**60,)))],
            "truncated data file .*tensor 'x'",
        ),
        ([(b"", header_proto()), (b"x", entry_proto(A, 0, size=15))], "has 15 bytes"),
        ([(b"", header_proto()), (b"x", entry_proto(A, 0, shard=3))], "shard 3 of 1"),
        ([(b"", header_proto()), (b"x", entry_proto(A, 0, dtype=9))], "dtype int64 has 16 bytes"),
        ([(b"", header_proto()), (b"x", entry_proto(A, 0)[:-2])], "truncated fixed-width"),
        ([(b"", header_proto()), (b"x", entry_proto(A, 0) + b"\xff" * 11)], "overlong varint"),
        ([(b"", header_proto(num_shards=10**9))], "bad shard count"),
        ([(b"", header_proto(endianness=1))], "big-endian"),
        ([(b"", header_proto(min_consumer=2))], "unsupported bundle version"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_malformed_index_contents(tmp_path, items, message):
    write_index(tmp_path / "m.index", items)
    (tmp_path / "m.data-00000-of-00001").write_bytes(A.tobytes())
    with pytest.raises(CheckpointError, match=message):
        TensorBundleReader(tmp_path / "m")


# --- found by fuzzing (tests/robustness/test_fuzz.py) or by reading the format for cost -------------------


@pytest.mark.parametrize(
    ("shape", "dtype", "size"),
    [((0, 2**62), 1, 0), ((2**40, 0, 2**40), 9, 0)],
    ids=["empty-with-huge-dim", "empty-between-huge-dims"],
)
def test_empty_tensor_with_impossible_shape(tmp_path, shape, dtype, size):
    # numpy refuses such shapes even for zero elements: the reader must say so, not raise ValueError.
    items = [
        (b"", header_proto()),
        (b"x", entry_proto(np.zeros(0, np.float32), 0, dtype=dtype, size=size, shape=shape)),
    ]
    write_index(tmp_path / "m.index", items)
    (tmp_path / "m.data-00000-of-00001").write_bytes(b"")
    with pytest.raises(CheckpointError, match="impossibly large shape"):
        TensorBundleReader(tmp_path / "m")


def test_rank_beyond_numpy_is_listed_but_refused(tmp_path):
    array = np.ones((1,) * 40, np.float32)
    items = [(b"", header_proto()), (b"deep", entry_proto(array, 0)), (b"flat", entry_proto(A, 4))]
    write_index(tmp_path / "m.index", items)
    (tmp_path / "m.data-00000-of-00001").write_bytes(array.tobytes() + A.tobytes())
    with TensorBundleReader(tmp_path / "m") as reader:
        assert reader.info("deep").shape == (1,) * 40 and reader.info("deep").unsupported.startswith("rank 40")
        with pytest.raises(CheckpointError, match="unsupported rank 40"):
            reader.read("deep")
        np.testing.assert_array_equal(reader.read("flat"), A)


def raw_block(entries: list[tuple[int, bytes, bytes]], num_restarts: int = 1) -> bytes:
    """A block from (shared, unshared key bytes, value) triples, as hostile as asked."""
    body = b"".join(varint(shared) + varint(len(delta)) + varint(len(value)) + delta + value
                    for shared, delta, value in entries)  # fmt: skip
    return body + b"\0" * 4 * num_restarts + struct.pack("<I", num_restarts)


def write_table(path: Path, data_blocks: list[bytes], handles: list[int]) -> None:
    """An index whose index block points at `data_blocks[i]` for each i in `handles`, repeats allowed."""
    out, where = bytearray(), []
    for contents in [*data_blocks]:
        where.append(varint(len(out)) + varint(len(contents)))
        out += contents + b"\0" + struct.pack("<I", mask_crc32c(google_crc32c.value(contents + b"\0")))
    index = raw_block([(0, b"\xff" * (i + 1), where[h]) for i, h in enumerate(handles)])
    index_handle = varint(len(out)) + varint(len(index))
    out += index + b"\0" + struct.pack("<I", mask_crc32c(google_crc32c.value(index + b"\0")))
    out += (varint(0) + varint(0) + index_handle).ljust(40, b"\0") + struct.pack("<Q", TABLE_MAGIC)
    path.write_bytes(bytes(out))


def test_index_pointing_at_one_block_many_times_is_refused(tmp_path):
    # Each handle to a large entry-less block would be read and checksummed again: quadratic in the file.
    empty_but_large = raw_block([], num_restarts=50_000)
    write_table(tmp_path / "m.index", [raw_block([(0, b"", header_proto())]), empty_but_large], [0, 1, 1, 1])
    with pytest.raises(CheckpointError, match="data block at .* overlaps the block before it"):
        TensorBundleReader(tmp_path / "m")


def test_prefix_compressed_names_cannot_blow_up(tmp_path):
    # Each entry reuses the whole previous name and adds a byte: this 44 KB index would rebuild 90 MB
    # of names (one of 1 MB, 30 GB). The reader stops once the names outgrow the index many times over.
    entries = [(0, b"", header_proto()), (0, b"a" * 4000, b"")]
    entries += [(4000 + i, b"a", b"") for i in range(10_000)]
    write_table(tmp_path / "m.index", [raw_block(entries)], [0])
    (tmp_path / "m.data-00000-of-00001").write_bytes(b"")
    with pytest.raises(CheckpointError, match="tensor names add up to far more bytes than the index holds"):
        TensorBundleReader(tmp_path / "m")


def test_index_or_shard_that_is_not_a_regular_file(copy_of_small, tmp_path):
    data_file(copy_of_small).unlink()
    os.mkfifo(data_file(copy_of_small))  # stat says 0 bytes; opening it would block
    with pytest.raises(CheckpointError, match="data shard .*data-00000-of-00001 is not a regular file"):
        TensorBundleReader(copy_of_small)
    os.mkfifo(tmp_path / "fifo.index")
    with pytest.raises(CheckpointError, match="checkpoint index .*fifo.index is not a regular file"):
        TensorBundleReader(tmp_path / "fifo")


def test_read_into_a_reused_buffer(fixture_ckpt):
    with TensorBundleReader(fixture_ckpt / "model.ckpt") as reader:
        biggest = max(info.size for info in reader.infos() if not info.unsupported)
        scratch = np.full(biggest + 7, 0xAB, dtype=np.uint8)
        for name in reader.keys():
            got = reader.read(name, out=scratch)
            assert np.shares_memory(got, scratch) or got.size == 0
            np.testing.assert_array_equal(got, reader.read(name))
        with pytest.raises(UsageError, match="at least"):
            reader.read(max(reader.keys(), key=lambda n: reader.info(n).size), out=scratch[:16])
        with pytest.raises(UsageError, match="uint8"):
            reader.read("global_step", out=np.zeros(64, dtype=np.float32))
