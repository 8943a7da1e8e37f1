"""The few TensorFlow protocol buffers a SavedModel's names and graph facts live in, decoded without TensorFlow.

- `object_graph`: the `_CHECKPOINTABLE_OBJECT_GRAPH` entry of a SavedModel's variables bundle, a serialized
  `TrackableObjectGraph`: every object (model, layer, variable), its children by local name, and for each
  variable its `full_name` (`stem_conv/kernel`) and the bundle key it is saved under.
- `graph_facts`: from `saved_model.pb` (a `SavedModel`), the serving signature's input and output shapes, the
  small float constants of its functions (keras.applications' Rescaling scales are constants of the traced
  graph, not variables) and which ops it uses.

Decoded with `effconv.formats.bundle`'s wire-format reader (field number, wire type, value); fields not
listed here are skipped. Malformed bytes raise a `CheckpointError` naming the file.
"""

from __future__ import annotations

import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import google_crc32c
import numpy as np

from effconv.errors import CheckpointError
from effconv.formats.bundle import _fields, _FormatError, _parse_shape, _signed, _varint, unmask_crc32c

__all__ = ["GraphFacts", "ObjectNode", "graph_facts", "object_graph", "read_string_scalar"]

_DT_FLOAT = 1
_MAX_CONSTANT_VALUES = 16  # the constants of interest are scalars and per-channel vectors
_MAX_PB_BYTES = 2**31  # protobuf's own limit on a message


def read_string_scalar(reader, name: str) -> bytes:
    """A scalar string tensor of a tensor bundle (which `TensorBundleReader.read` refuses), crc32c-checked.

    On disk: the element's length as a varint, a masked crc32c of that length (as a uint32, or uint64 past
    4 GiB), then the bytes; the entry's crc32c covers the length, its checksum and the bytes.
    """
    info = reader.info(name)
    if info.dtype_name != "string" or info.shape != ():
        raise CheckpointError(f"{name} in {reader.prefix} is not a scalar string tensor")
    with open(reader.shard_paths[info.shard], "rb") as f:
        f.seek(info.offset)
        raw = f.read(info.size)
    try:
        length, pos = _varint(raw, 0, len(raw))
    except _FormatError as e:
        raise CheckpointError(f"{name} in {reader.prefix}: {e}") from None
    if pos + 4 + length != len(raw):
        raise CheckpointError(f"{name} in {reader.prefix}: its length does not fit its {len(raw)} bytes")
    packed = struct.pack("<I", length) if length <= 0xFFFFFFFF else struct.pack("<Q", length)
    (masked,) = struct.unpack_from("<I", raw, pos)
    if unmask_crc32c(masked) != google_crc32c.value(packed):
        raise CheckpointError(f"crc32c mismatch in the length of {name} in {reader.prefix}: the data is corrupted")
    if google_crc32c.value(packed + raw[pos:]) != info.crc32c:
        raise CheckpointError(f"crc32c mismatch in {name} of {reader.prefix}: the data file is corrupted")
    return raw[pos + 4 :]


@dataclass
class ObjectNode:
    """One object of a TrackableObjectGraph: its children (node id, local name) and its saved tensors."""

    children: list[tuple[int, str]] = field(default_factory=list)
    attributes: list[tuple[str, str, str]] = field(default_factory=list)  # (name, full_name, checkpoint_key)


def _text(value, what: str) -> str:
    if not isinstance(value, bytes):
        raise _FormatError(f"{what} is not a string")
    return value.decode("utf-8", "replace")


def object_graph(data: bytes, where: str) -> list[ObjectNode]:
    """The nodes of a serialized TrackableObjectGraph, by node id."""
    nodes = []
    try:
        for number, wire, value in _fields(data):
            if number != 1 or wire != 2:
                continue
            node = ObjectNode()
            for n, w, v in _fields(value):
                if n == 1 and w == 2:  # ObjectReference
                    node_id, local = 0, ""
                    for rn, rw, rv in _fields(v):
                        if rn == 1 and rw == 0:
                            node_id = _signed(rv)
                        elif rn == 2:
                            local = _text(rv, "a child's local name")
                    node.children.append((node_id, local))
                elif n == 2 and w == 2:  # SerializedTensor
                    parts = {1: "", 2: "", 3: ""}
                    for sn, _sw, sv in _fields(v):
                        if sn in parts:
                            parts[sn] = _text(sv, "a saved tensor's name")
                    node.attributes.append((parts[1], parts[2], parts[3]))
            nodes.append(node)
    except _FormatError as e:
        raise CheckpointError(f"{where}: the object graph is corrupt: {e}") from None
    for node in nodes:
        if any(not 0 <= child < len(nodes) for child, _ in node.children):
            raise CheckpointError(f"{where}: the object graph refers to an object it does not hold")
    return nodes


@dataclass
class GraphFacts:
    """What `saved_model.pb` says that the variables do not."""

    inputs: dict[str, tuple[int, ...] | None] = field(default_factory=dict)  # serving_default's, -1: any size
    outputs: dict[str, tuple[int, ...] | None] = field(default_factory=dict)
    constants: list[tuple[str, tuple[float, ...]]] = field(default_factory=list)  # small float Consts (node, values)
    ops: Counter = field(default_factory=Counter)


def _map_entries(value: bytes) -> tuple[str, bytes]:
    key, item = "", b""
    for n, _w, v in _fields(value):
        if n == 1:
            key = _text(v, "a map key")
        elif n == 2 and isinstance(v, bytes):
            item = v
    return key, item


def _tensor_info_shape(info: bytes) -> tuple[int, ...] | None:
    for n, w, v in _fields(info):
        if n == 3 and w == 2:
            return _parse_shape(v)
    return None


def _signature(value: bytes, facts: GraphFacts) -> None:
    for n, w, v in _fields(value):
        if w != 2 or n not in (1, 2):
            continue
        key, item = _map_entries(v)
        (facts.inputs if n == 1 else facts.outputs)[key] = _tensor_info_shape(item)


def _float_constant(attr_value: bytes) -> tuple[float, ...] | None:
    """The values of a float TensorProto in an AttrValue, when it is small."""
    for n, w, v in _fields(attr_value):
        if n != 8 or w != 2:
            continue
        dtype, shape, content, floats = 0, (), b"", []
        for tn, tw, tv in _fields(v):
            if tn == 1 and tw == 0:
                dtype = tv
            elif tn == 2 and tw == 2:
                shape = _parse_shape(tv) or ()
            elif tn == 4 and tw == 2:
                content = tv
            elif tn == 5 and tw == 2:  # packed
                floats += list(np.frombuffer(tv, "<f4", len(tv) // 4))
            elif tn == 5 and tw == 5:
                floats.append(struct.unpack("<f", struct.pack("<I", tv))[0])
        if dtype != _DT_FLOAT:
            return None
        count = int(np.prod(shape)) if shape else 1
        if count > _MAX_CONSTANT_VALUES:
            return None
        if content:
            if len(content) != 4 * count:
                return None
            return tuple(float(x) for x in np.frombuffer(content, "<f4"))
        if floats:  # a repeated last value fills the rest
            return tuple(float(x) for x in (floats + [floats[-1]] * count)[:count])
        return (0.0,) * count
    return None


def _node(value: bytes, facts: GraphFacts) -> None:
    name = op = ""
    attrs = []
    for n, w, v in _fields(value):
        if n == 1:
            name = _text(v, "a node name")
        elif n == 2:
            op = _text(v, "an op name")
        elif n == 5 and w == 2:
            attrs.append(v)
    facts.ops[op] += 1
    if op != "Const":
        return
    for entry in attrs:
        key, item = _map_entries(entry)
        if key == "value" and (values := _float_constant(item)) is not None:
            facts.constants.append((name, values))


def _graph_def(value: bytes, facts: GraphFacts) -> None:
    for n, w, v in _fields(value):
        if n == 1 and w == 2:
            _node(v, facts)
        elif n == 2 and w == 2:  # the function library
            for ln, lw, lv in _fields(v):
                if ln == 1 and lw == 2:
                    for fn, fw, fv in _fields(lv):
                        if fn == 3 and fw == 2:
                            _node(fv, facts)


def graph_facts(path: Path) -> GraphFacts:
    """Signature shapes, small float constants and op counts of the serving graph in `saved_model.pb`."""
    try:
        size = path.stat().st_size
        if size > _MAX_PB_BYTES:
            raise CheckpointError(f"{path} is larger than a protocol buffer can be")
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}") from None
    facts = GraphFacts()
    try:
        for number, wire, value in _fields(data):
            if number != 2 or wire != 2:  # meta_graphs
                continue
            for n, w, v in _fields(value):
                if n == 2 and w == 2:
                    _graph_def(v, facts)
                elif n == 5 and w == 2:
                    key, item = _map_entries(v)
                    if key == "serving_default":
                        _signature(item, facts)
    except _FormatError as e:
        raise CheckpointError(f"{path} is not a readable SavedModel protocol buffer: {e}") from None
    return facts
