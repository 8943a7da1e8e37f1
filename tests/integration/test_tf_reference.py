"""Our TF2 reference forward against the official code's own outputs (the official-b0 fixture)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

from effconv.errors import MappingError
from effconv.models import spec
from effconv.models.tf_reference import TFReferenceModel, official_variable_shapes
from tests.support.helpers import assert_close, max_abs

EMA = "/ExponentialMovingAverage"


@pytest.fixture(scope="module")
def fixture_weights(fixture_dir):
    """(ema, raw): the fixture's values under the base official names."""
    reader = tf.train.load_checkpoint(str(fixture_dir / "ckpt" / "model.ckpt"))
    names = official_variable_shapes("b0")
    return (
        {n: reader.get_tensor(n + EMA) for n in names},
        {n: reader.get_tensor(n) for n in names},
    )


@pytest.fixture(scope="module")
def ema_model(fixture_weights):
    return TFReferenceModel("b0", fixture_weights[0])


def test_ema_logits_and_every_endpoint_match_the_official_code(ema_model, oracle, endpoints):
    out = ema_model(oracle["x"], endpoints=True)
    assert set(out) == set(endpoints) | {"logits"}
    assert_close(out["logits"], oracle["logits_ema"], what="logits")
    for key, expected in endpoints.items():
        assert out[key].shape == expected.shape, key
        assert_close(out[key], expected, what=key)
    # Far from what the wrong BN epsilon gives: the comparison can tell.
    assert max_abs(out["logits"], oracle["logits_ema_eps1e5"]) > 1.0


def test_logits_without_endpoints_are_the_same(ema_model, oracle):
    assert_close(ema_model(oracle["x"]), oracle["logits_ema"])


def test_pixel_paths_match(ema_model, oracle):
    standard = (oracle["pixels"] - oracle["mean_rgb"]) / oracle["stddev_rgb"]
    assert_close(ema_model(standard), oracle["logits_pixels_std"], what="standard")
    assert_close(ema_model(oracle["pixels"] * (2 / 255) - 1), oracle["logits_pixels_advprop"], what="advprop")


def test_raw_weights_give_the_raw_logits(fixture_weights, oracle):
    raw_model = TFReferenceModel("b0", fixture_weights[1])
    logits = raw_model(oracle["x"])
    assert_close(logits, oracle["logits_raw"])  # RAW logits reach 62: the limit scales with them
    assert max_abs(logits, oracle["logits_ema"]) > 1.0


@pytest.mark.parametrize("size", [97, 225])
def test_odd_input_sizes_run_with_same_padding_shapes(ema_model, size):
    x = np.random.default_rng(size).standard_normal((1, size, size, 3), dtype=np.float32)
    out = ema_model(x, endpoints=True)
    assert out["stem"].shape == (1, math.ceil(size / 2), math.ceil(size / 2), 32)
    side = math.ceil(size / 32)
    assert out["features"].shape == (1, side, side, 320)
    assert out["logits"].shape == (1, 1000) and np.isfinite(out["logits"]).all()


def test_variable_shapes_equal_the_official_checkpoint(fixture_dir):
    official = {}
    for line in (fixture_dir / "variables.txt").read_text().splitlines():
        name, shape, _dtype = line.split("\t")
        if name.endswith(EMA) or name == "global_step":
            continue
        official[name] = tuple(int(d) for d in shape.strip("[]").split(",") if d.strip())
    assert official_variable_shapes("b0") == official


def test_variable_shapes_options():
    plain = official_variable_shapes("b3")
    no_head = official_variable_shapes("b3", num_classes=0)
    assert set(plain) - set(no_head) == {"efficientnet-b3/head/dense/kernel", "efficientnet-b3/head/dense/bias"}
    assert official_variable_shapes("b3", 10)["efficientnet-b3/head/dense/kernel"] == (spec.head_channels("b3"), 10)
    renamed = official_variable_shapes("b3", bn_name="batch_normalization", prefix="net")
    assert list(renamed) == [
        n.replace("efficientnet-b3/", "net/").replace("tpu_batch_normalization", "batch_normalization") for n in plain
    ]
    l2 = official_variable_shapes("l2")
    assert next(iter(l2)) == "efficientnet-l2/stem/conv2d/kernel"
    trainable = [s for n, s in l2.items() if not n.endswith(("moving_mean", "moving_variance"))]
    assert sum(math.prod(s) for s in trainable) == 480_309_308  # the published parameter count


def test_renamed_weights_give_the_same_logits(fixture_weights, oracle):
    ema = fixture_weights[0]
    renamed = {
        n.replace("efficientnet-b0/", "custom/").replace("tpu_batch_normalization", "batch_normalization"): v
        for n, v in ema.items()
    }
    model = TFReferenceModel("b0", renamed, bn_name="batch_normalization", prefix="custom")
    assert_close(model(oracle["x"]), oracle["logits_ema"])


def test_headless_weights_give_pooled_features(fixture_weights, oracle, endpoints):
    headless = {n: v for n, v in fixture_weights[0].items() if "/head/dense/" not in n}
    model = TFReferenceModel("b0", headless)
    assert model.num_classes == 0
    out = model(oracle["x"], endpoints=True)
    assert "logits" not in out
    assert_close(model(oracle["x"]), endpoints["pooled_features"])


def test_missing_or_misshapen_weight_is_named(fixture_weights):
    ema = dict(fixture_weights[0])
    name = "efficientnet-b0/blocks_3/tpu_batch_normalization_1/gamma"
    del ema[name]
    with pytest.raises(MappingError, match=name):
        TFReferenceModel("b0", ema)
    ema[name] = np.ones(7, np.float32)
    with pytest.raises(MappingError, match=name):
        TFReferenceModel("b0", ema)
    with pytest.raises(MappingError, match="head/dense/kernel"):
        TFReferenceModel("b0", fixture_weights[0], num_classes=10)
