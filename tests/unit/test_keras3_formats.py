"""The pieces of the Keras 3 readers that need no Keras: names, variable positions, the head and input checks,
the protobuf decoding of a SavedModel's object graph, and the agreement of `model.export`'s two copies."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest

from effconv.errors import CheckpointError
from effconv.formats.keras import KERAS_IMAGENET_MEAN, KERAS_IMAGENET_STD
from effconv.formats.keras3_model import (
    KerasGraph,
    KLayer,
    _same,
    compensating_rescaling,
    fold_input,
    split,
    variables_of,
)
from effconv.formats.keras3_store import snake_case
from effconv.formats.saved_model import SavedModelFormat
from effconv.formats.tf_protos import object_graph
from effconv.variants import IMAGENET_MEAN, IMAGENET_STD
from tests.unit.test_bundle import pb_bytes, pb_varint


def test_store_names_follow_keras_snake_case():
    expected = {
        "Conv2D": "conv2d",
        "DepthwiseConv2D": "depthwise_conv2d",
        "BatchNormalization": "batch_normalization",
        "GlobalAveragePooling2D": "global_average_pooling2d",
        "ZeroPadding2D": "zero_padding2d",
        "InputLayer": "input_layer",
        "Functional": "functional",
    }
    assert {name: snake_case(name) for name in expected} == expected


def test_variables_by_position_follow_class_and_config():
    assert variables_of("Conv2D", {"use_bias": False}, ["k"], "c") == {"kernel": "k"}
    assert variables_of("Conv2D", {"use_bias": True}, ["k", "b"], "c") == {"kernel": "k", "bias": "b"}
    assert variables_of("Dense", {}, ["k", "b"], "d") == {"kernel": "k", "bias": "b"}  # no config: by count
    bn = variables_of("BatchNormalization", {"center": True, "scale": True}, list("0123"), "bn")
    assert list(bn) == ["gamma", "beta", "moving_mean", "moving_variance"]
    assert variables_of("Normalization", {"mean": [0.5] * 3, "variance": [1] * 3}, [], "n") == {}
    assert list(variables_of("Normalization", {"mean": None, "variance": None}, list("012"), "n")) == [
        "mean",
        "variance",
        "count",
    ]
    with pytest.raises(CheckpointError, match="holds 1 weights"):
        variables_of("Conv2D", {"use_bias": True}, ["k"], "c")


def test_tf_same_padding_of_stride_2():
    # (size, kernel) -> (before, after), as TensorFlow pads 'SAME' (and Keras' correct_pad at a fixed size)
    cases = {(224, 3): (0, 1), (225, 3): (1, 1), (112, 5): (1, 2), (57, 5): (2, 2), (9, 3): (1, 1)}
    assert {k: _same(*k) for k in cases} == cases


def _backbone() -> list[KLayer]:
    return [
        KLayer("Conv2D", "stem_conv", weights={"kernel": "stem_conv/kernel"}),
        KLayer("Activation", "top_activation"),
    ]


def _graph(head: list[KLayer], pre: list[KLayer] | None = None) -> KerasGraph:
    return KerasGraph([*(pre or []), *_backbone(), *head], "m", "test")


def _dense(name: str = "dense", bias: bool = True) -> KLayer:
    weights = {"kernel": f"{name}/kernel"} | ({"bias": f"{name}/bias"} if bias else {})
    return KLayer("Dense", name, {"units": 3, "activation": "softmax"}, weights)


def test_head_of_pooling_dropout_and_dense():
    head = [KLayer("GlobalAveragePooling2D", "gap"), KLayer("Dropout", "drop", {"rate": 0.5}), _dense()]
    model = split(_graph(head))
    assert model.classifier.name == "dense" and model.output == "logits" and model.activation == "softmax"
    assert model.num_classes == 3
    assert split(_graph(head[:1])).output == "pooled features" and split(_graph([])).output == "feature map"


@pytest.mark.parametrize(
    "head, needle",
    [
        ([_dense()], "reads the unpooled feature map"),
        ([KLayer("GlobalAveragePooling2D", "g", {"keepdims": True}), _dense()], "keeps dims"),
        ([KLayer("GlobalAveragePooling2D", "g"), _dense("a"), _dense("b")], "a Dense layer (b) after its Dense"),
        ([KLayer("GlobalAveragePooling2D", "g"), _dense(bias=False)], "has no bias"),
        ([KLayer("GlobalMaxPooling2D", "m")], "a GlobalMaxPooling2D layer (m)"),
        ([KLayer("GlobalAveragePooling2D", "g", inbound=("x",), previous="top_activation")], "not a chain"),
    ],
)
def test_heads_effconv_cannot_express(head, needle):
    with pytest.raises(CheckpointError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        split(_graph(head))


def test_layers_before_the_stem():
    with pytest.raises(CheckpointError, match="a Resizing layer"):
        split(_graph([], [KLayer("Resizing", "r")]))
    with pytest.raises(CheckpointError, match="a RandomCrop layer"):  # it crops at inference too
        split(_graph([], [KLayer("RandomCrop", "c")]))
    split(_graph([], [KLayer("RandomFlip", "f"), KLayer("RandomRotation", "r")]))


def test_fold_input_computes_as_the_graph_does():
    pre = [
        KLayer("RandomFlip", "flip"),
        KLayer("Rescaling", "rescaling", {"scale": 1 / 255, "offset": 0.0}),
        KLayer("Normalization", "normalization", {"axis": [3]}, {"mean": "m", "variance": "v"}),
        compensating_rescaling("rescaling_1", "test"),
    ]
    stored = {"m": list(KERAS_IMAGENET_MEAN), "v": list(KERAS_IMAGENET_STD)}
    norm = fold_input(split(_graph([], pre)), stored.__getitem__)
    np.testing.assert_allclose(norm.mean, IMAGENET_MEAN, rtol=1e-9)
    np.testing.assert_allclose(norm.std, IMAGENET_STD, rtol=1e-9)
    assert norm.steps[0] == "flip (RandomFlip): identity at inference" and len(norm.steps) == 4
    # without the compensating Rescaling (weights=None): divided by sqrt of the stored std
    norm = fold_input(split(_graph([], pre[:3])), stored.__getitem__)
    np.testing.assert_allclose(norm.std, [255 * math.sqrt(s) for s in KERAS_IMAGENET_STD], rtol=1e-9)
    config = KLayer("Normalization", "n", {"mean": [0.5, 0.5, 0.5], "variance": [0.25, 0.25, 0.25], "axis": -1})
    norm = fold_input(split(_graph([], [config])), stored.__getitem__)
    assert norm.mean == [0.5] * 3 and norm.std == [0.5] * 3
    with pytest.raises(CheckpointError, match="along axis"):
        fold_input(split(_graph([], [KLayer("Normalization", "n", {"axis": 1, "mean": [0], "variance": [1]})])), None)


def _object(children=(), attributes=()) -> bytes:
    body = b"".join(pb_bytes(1, pb_varint(1, node) + pb_bytes(2, name.encode())) for node, name in children)
    for name, full, key in attributes:
        body += pb_bytes(2, pb_bytes(1, name.encode()) + pb_bytes(2, full.encode()) + pb_bytes(3, key.encode()))
    return pb_bytes(1, body)


def test_object_graph_decodes_children_and_variable_names():
    data = _object([(1, "variables")]) + _object([], [("VARIABLE_VALUE", "stem_conv/kernel", "variables/0/x")])
    nodes = object_graph(data, "test")
    assert nodes[0].children == [(1, "variables")] and nodes[0].attributes == []
    assert nodes[1].attributes == [("VARIABLE_VALUE", "stem_conv/kernel", "variables/0/x")]
    with pytest.raises(CheckpointError, match="does not hold"):
        object_graph(_object([(7, "missing")]), "test")
    with pytest.raises(CheckpointError, match="corrupt"):
        object_graph(data[:-3], "test")


@dataclass
class _Info:
    shape: tuple
    dtype_name: str
    size: int
    crc32c: int


class _Bundle:
    def __init__(self, infos):
        self.infos = infos

    def keys(self):
        return list(self.infos)

    def __contains__(self, key):
        return key in self.infos

    def info(self, key):
        return self.infos[key]


def test_export_copies_are_read_once_and_must_agree(tmp_path):
    nodes = object_graph(
        _object([(1, "variables"), (2, "_all_variables")])
        + _object([], [("VARIABLE_VALUE", "stem_conv/kernel", "variables/0")])
        + _object([], [("VARIABLE_VALUE", "stem_conv/kernel", "_all_variables/5")]),
        "test",
    )
    same = _Bundle({"variables/0": _Info((3,), "float", 12, 7), "_all_variables/5": _Info((3,), "float", 12, 7)})
    names, reasons, saved_as = SavedModelFormat._names(same, nodes, tmp_path)
    assert names == {"variables/0": "stem_conv/kernel"} and saved_as.startswith("model.export")
    assert reasons["_all_variables/5"].startswith("second copy of stem_conv/kernel")
    other = _Bundle({"variables/0": _Info((3,), "float", 12, 7), "_all_variables/5": _Info((3,), "float", 12, 8)})
    with pytest.raises(CheckpointError, match="hold different values"):
        SavedModelFormat._names(other, nodes, tmp_path)
