"""Keras EfficientNetV2 as data, without Keras: its input constants fold to each size's official normalisation,
every keras.applications arch is told apart by what each container shows, and the serving graph's constants
are taken all or none."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from effconv.errors import CheckpointError
from effconv.formats.keras3_graph import _coded_graph_input, _signature, backbone_layers, coded_input
from effconv.formats.keras3_model import KerasGraph, KLayer, fold_input, keras_archs, split
from effconv.mappings import keras
from effconv.models import spec

V2 = ["v2-b0", "v2-b1", "v2-b2", "v2-b3", "v2-s", "v2-m", "v2-l"]


def _model(pre: list[KLayer], graph: KerasGraph | None = None):
    graph = graph or KerasGraph([], "m", "test")
    graph.layers = [*pre, KLayer("Conv2D", "stem_conv"), KLayer("Activation", "top_activation")]
    return split(graph)


def test_keras_applications_builds_every_v2_size_but_xl():
    assert sorted(a for a in keras_archs() if a.startswith("v2-")) == sorted(V2)
    assert set(keras.KERAS3_CODED_INPUT) == set(V2)


@pytest.mark.parametrize("arch", V2)
def test_v2_input_constants_fold_to_the_official_normalisation(arch):
    """B0-B3: ImageNet mean/std; S, M, L: (x - 128) / 128, as effconv's model card gives for official checkpoints."""
    norm = fold_input(_model(coded_input(arch, "assumed")), None)
    official = spec.preprocessing_of(arch)
    np.testing.assert_allclose(norm.mean, official.mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(norm.std, official.std, rtol=1e-9)
    assert norm.note == "rescaling: assumed"


def test_every_keras_arch_is_told_apart_by_names_and_by_class_counts():
    by_names = Counter((len(spec.blocks(a)), spec.stem_channels(a), spec.head_channels(a)) for a in keras_archs())
    assert max(by_names.values()) == 1
    assert max(Counter(_signature(a) for a in keras_archs()).values()) == 1
    # why the weights file counts every weight class: B0 and V2-B0 agree in depthwise convs, stem and head
    (_, dw, _, stem, head), (_, v2_dw, _, v2_stem, v2_head) = _signature("b0"), _signature("v2-b0")
    assert (dw, stem, head) == (v2_dw, v2_stem, v2_head) == (16, 32, 1280) and _signature("b0") != _signature("v2-b0")


def test_v2_backbone_layers_in_keras_order():
    layers = backbone_layers("v2-s")
    assert layers[:3] == (
        ("stem_conv", "Conv2D"),
        ("stem_bn", "BatchNormalization"),
        ("block1a_project_conv", "Conv2D"),
    )
    assert ("block2a_expand_conv", "Conv2D") in layers and ("block4a_dwconv2", "DepthwiseConv2D") in layers
    assert layers[-2:] == (("top_conv", "Conv2D"), ("top_bn", "BatchNormalization"))
    assert sum(kind == "DepthwiseConv2D" for _, kind in layers) == 6 + 9 + 15  # the MBConv stages only


def test_serving_graph_constants_are_taken_all_or_none():
    names = {(0.0078125,): "Const_1", (-1.0,): "Const_2"}
    graph = KerasGraph([], "m", "test")
    pre = _coded_graph_input("v2-s", lambda values: names.get(tuple(values)), graph)
    assert [layer.kind for layer in pre] == ["Rescaling"] and "its constants Const_1" in pre[0].note
    assert pre[0].config == {"scale": 1 / 128, "offset": -1.0}
    assert graph.facts["input_constants"] == {"rescaling's scale": "Const_1"}
    graph = KerasGraph([], "m", "test")
    assert _coded_graph_input("v2-b1", lambda values: None, graph) == []
    norm = fold_input(_model([], graph), None)
    assert norm.mean == [0.0] * 3 and norm.std == [1.0] * 3 and "include_preprocessing=False" in norm.note
    with pytest.raises(CheckpointError, match="but not normalization's mean, normalization's variance"):
        _coded_graph_input("v2-b0", lambda values: "Const" if len(values) == 1 else None, KerasGraph([], "m", "t"))


def test_a_users_padding_before_the_stem_is_refused():
    _model([KLayer("ZeroPadding2D", "stem_conv_pad")])  # EfficientNetB0..B7's own
    with pytest.raises(CheckpointError, match="a ZeroPadding2D layer \\(zero_padding2d\\)"):
        _model([KLayer("ZeroPadding2D", "zero_padding2d")])
