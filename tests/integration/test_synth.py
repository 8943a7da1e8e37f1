"""Synthetic official-format checkpoints: exact layout, sane values, reproducible."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from effconv.errors import UsageError
from effconv.models import spec
from effconv.models.tf_reference import TFReferenceModel, official_variable_shapes
from effconv.parity.synth import write_checkpoint, write_synthetic_checkpoint

EMA = "/ExponentialMovingAverage"


def listing(prefix) -> dict[str, tuple[int, ...]]:
    return {name: tuple(shape) for name, shape in tf.train.list_variables(str(prefix))}


def expected_listing(shapes, raw=True, ema=True) -> dict[str, tuple[int, ...]]:
    out = {"global_step": ()}
    for name, shape in shapes.items():
        if raw:
            out[name] = shape
        if ema:
            out[name + EMA] = shape
    return out


def logits(arch, prefix, suffix, size, **kw) -> np.ndarray:
    reader = tf.train.load_checkpoint(str(prefix))
    names = official_variable_shapes(arch, **kw)
    model = TFReferenceModel(arch, {n: reader.get_tensor(n + suffix) for n in names}, **kw)
    x = np.random.default_rng(size).standard_normal((2, size, size, 3), dtype=np.float32)
    return model(x)


@pytest.fixture(scope="module")
def b0(tmp_path_factory):
    return write_synthetic_checkpoint("b0", tmp_path_factory.mktemp("b0"), global_step=1234)


def test_b0_layout_is_the_official_one(b0):
    assert b0.name == "model.ckpt"
    assert {p.name for p in b0.parent.iterdir()} == {
        "checkpoint",
        "model.ckpt.index",
        "model.ckpt.data-00000-of-00001",
    }
    assert (b0.parent / "checkpoint").read_text().splitlines() == [
        'model_checkpoint_path: "model.ckpt"',
        'all_model_checkpoint_paths: "model.ckpt"',
    ]
    assert listing(b0) == expected_listing(official_variable_shapes("b0"))
    reader = tf.train.load_checkpoint(str(b0))
    assert reader.get_tensor("global_step") == 1234
    dtypes = reader.get_variable_to_dtype_map()
    assert dtypes.pop("global_step") == tf.int64
    assert set(dtypes.values()) == {tf.float32}


def test_b0_layout_matches_the_fixture_listing(b0, fixture_dir):
    official = {line.split("\t")[0] for line in (fixture_dir / "variables.txt").read_text().splitlines()}
    assert set(listing(b0)) == official


def test_raw_and_ema_differ_everywhere_and_both_are_sane(b0):
    reader = tf.train.load_checkpoint(str(b0))
    for name in official_variable_shapes("b0"):
        assert not np.array_equal(reader.get_tensor(name), reader.get_tensor(name + EMA)), name
    ema, raw = logits("b0", b0, EMA, 224), logits("b0", b0, "", 224)
    for values in (ema, raw):
        assert np.isfinite(values).all() and 0.5 < values.std() < 10
    assert np.abs(ema - raw).max() > 1.0


@pytest.mark.parametrize("size", [97, 224, 225])
def test_ema_logits_are_well_scaled(b0, size):
    values = logits("b0", b0, EMA, size)
    assert np.isfinite(values).all()
    assert 0.1 < values.std() < 50
    assert np.abs(values[0] - values[1]).max() > 0.1  # depends on the input


def test_bn_statistics_are_calibrated_with_a_few_tiny_variances(b0):
    reader = tf.train.load_checkpoint(str(b0))
    variances = [reader.get_tensor(n + EMA) for n in official_variable_shapes("b0") if n.endswith("moving_variance")]
    everything = np.concatenate(variances)
    assert (everything > 0).all()
    tiny = everything < 1e-3 * np.median(everything)
    assert 0 < tiny.sum() < 0.05 * everything.size


def test_ema_only_and_raw_only(tmp_path):
    shapes = official_variable_shapes("b0")
    ema_only = write_synthetic_checkpoint("b0", tmp_path / "ema", ema_only=True, calibrate=False)
    assert listing(ema_only) == expected_listing(shapes, raw=False)
    raw_only = write_synthetic_checkpoint("b0", tmp_path / "raw", raw_only=True, calibrate=False)
    assert listing(raw_only) == expected_listing(shapes, ema=False)
    with pytest.raises(UsageError):
        write_synthetic_checkpoint("b0", tmp_path / "both", ema_only=True, raw_only=True)


@pytest.mark.parametrize("num_classes", [10, 0])
def test_other_heads(tmp_path, num_classes):
    prefix = write_synthetic_checkpoint("b0", tmp_path, num_classes=num_classes, ema_only=True)
    assert listing(prefix) == expected_listing(official_variable_shapes("b0", num_classes), raw=False)
    values = logits("b0", prefix, EMA, 128, num_classes=num_classes)
    expected_width = num_classes or spec.head_channels("b0")
    assert values.shape == (2, expected_width) and np.isfinite(values).all()
    if num_classes:
        assert 0.1 < values.std() < 50


def test_batch_normalization_naming_and_prefix(tmp_path):
    kw = dict(bn_name="batch_normalization", prefix="my-net")
    prefix = write_synthetic_checkpoint("b0", tmp_path, calibrate=False, **kw)
    names = listing(prefix)
    assert names == expected_listing(official_variable_shapes("b0", **kw))
    assert not any("tpu_batch_normalization" in n for n in names)


def test_optimizer_slots_only_for_trainable_variables(tmp_path):
    prefix = write_synthetic_checkpoint("b0", tmp_path, optimizer_slots=True, calibrate=False)
    shapes = official_variable_shapes("b0")
    trainable = {n: s for n, s in shapes.items() if not n.endswith(("moving_mean", "moving_variance"))}
    expected = expected_listing(shapes)
    for name, shape in trainable.items():
        expected[name + "/RMSProp"] = expected[name + "/RMSProp_1"] = shape
    assert listing(prefix) == expected


def test_deterministic_for_a_seed(tmp_path, b0):
    again = write_synthetic_checkpoint("b0", tmp_path / "again", global_step=1234)
    other = write_synthetic_checkpoint("b0", tmp_path / "other", seed=1, ema_only=True, calibrate=False)
    first, second = tf.train.load_checkpoint(str(b0)), tf.train.load_checkpoint(str(again))
    for name in listing(b0):
        assert np.array_equal(first.get_tensor(name), second.get_tensor(name)), name
    kernel = "efficientnet-b0/stem/conv2d/kernel" + EMA
    assert not np.array_equal(first.get_tensor(kernel), tf.train.load_checkpoint(str(other)).get_tensor(kernel))


def test_b3_layout_and_scale(tmp_path):
    prefix = write_synthetic_checkpoint("b3", tmp_path)
    assert listing(prefix) == expected_listing(official_variable_shapes("b3"))
    values = logits("b3", prefix, EMA, spec.get_arch("b3").resolution)
    assert np.isfinite(values).all() and 0.1 < values.std() < 50


def test_write_checkpoint_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    weights = {
        "a/kernel": rng.standard_normal((3, 3, 2, 4), dtype=np.float32),
        "z": np.float32(2.5),
        "global_step": np.int64(7),
    }
    prefix = write_checkpoint(weights, tmp_path / "out")
    reader = tf.train.load_checkpoint(str(prefix))
    assert reader.get_variable_to_dtype_map() == {"a/kernel": tf.float32, "z": tf.float32, "global_step": tf.int64}
    for name, value in weights.items():
        assert np.array_equal(reader.get_tensor(name), value)


@pytest.mark.parametrize("arch", ["condconv-b0-8e", "v2-s"])
def test_new_families_layout_scale_and_raw_weights(tmp_path, arch):
    """CondConv (routing layers, expert kernels) and EfficientNetV2 (fused blocks): the official layout, logits of
    sane scale for both copies (the routing layers are not rescaled like the classifier), and the raw copy
    converted with --ema raw gives the TF reference's raw logits."""
    import torch

    from effconv.convert import convert_checkpoint
    from effconv.models import create_model
    from tests.support.helpers import assert_close, nchw

    prefix = write_synthetic_checkpoint(arch, tmp_path, num_classes=10)
    assert listing(prefix) == expected_listing(official_variable_shapes(arch, 10))
    for suffix in (EMA, ""):
        values = logits(arch, prefix, suffix, 96, num_classes=10)
        assert np.isfinite(values).all() and 0.1 < values.std() < 50, suffix
    result = convert_checkpoint(prefix, ema="raw", variant="standard")
    assert result.card["weights"] == "raw" and result.skipped.keys() == {
        n + EMA for n in official_variable_shapes(arch, 10)
    } | {"global_step"}
    model = create_model(arch, 10)
    model.load_state_dict(result.state_dict)
    x = np.random.default_rng(96).standard_normal((2, 96, 96, 3), dtype=np.float32)
    with torch.no_grad():
        assert_close(model(nchw(x)).numpy(), logits(arch, prefix, "", 96, num_classes=10), what=f"{arch} raw")
