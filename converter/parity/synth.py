"""Synthetic checkpoints in the official trainer's format, for any architecture.

The released checkpoints are large and downloaded; tests and benchmarks need
the same layout (official names and shapes, raw + `ExponentialMovingAverage`
shadows, `global_step`, optionally RMSProp slots) for every arch, offline.

The weights are random but behave like a trained network's: He-style kernels,
BN moving statistics calibrated layer by layer on a seeded N(0, 1) batch run
through our TF reference forward (so activations neither vanish nor explode),
the dense layer scaled to logits of std ~2, and a small gamma on the last BN of
residual branches (zero-init-last style) so the long residual stages of b7..l2
stay stable on images and sizes other than the calibration batch.
A few channels of every BN get a 1e4 times smaller input, and so moving
variance, as in real checkpoints: a wrong BN epsilon shows up on them at once.

The raw variables are the EMA ones with noise on the trainable weights and BN
statistics calibrated again for those weights: a different, equally sane
network, so raw and EMA logits differ clearly and neither explodes.

TensorFlow is imported inside the functions: importing this module is cheap.
Every random draw is a stateless function of (seed, variable name, purpose),
so nothing depends on the order in which variables are made.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from effconv.errors import UsageError
from effconv.models.spec import blocks, get_arch

CHECKPOINT_NAME = "model.ckpt"
EMA_SUFFIX = "ExponentialMovingAverage"
RMSPROP_SUFFIXES = ("RMSProp", "RMSProp_1")
MOVING_STATS = ("moving_mean", "moving_variance")

CALIBRATION_BATCH = 2
# Calibrating much below ~224 px misestimates the deep 7x7 stages (their maps
# become mostly border) and the network then explodes at the native size; 320
# keeps b7 at 600 px within ~2x of the target logits std. L2 costs ~20 s a pass.
MAX_CALIBRATION_SIZE = 320
LOGITS_STD = 2.0  # the official fixture's random b0 has 2.2
RESIDUAL_GAMMA = 0.25
TINY_CHANNEL_FRACTION = 0.01
TINY_CHANNEL_SCALE = 1e-2  # on the kernel column, so 1e-4 on the variance
STAT_NOISE = 0.05  # relative noise on the calibrated moving mean (in std units) and variance
RAW_NOISE = 0.1  # raw = ema * exp(RAW_NOISE * N(0, 1)): keeps signs and tiny channels


def write_checkpoint(weights: Mapping[str, Any], out_dir: str | os.PathLike) -> Path:
    """Write `weights` ({name: numpy array or tf tensor}) as the TF checkpoint `out_dir/model.ckpt`.

    Produces `model.ckpt.index`, `model.ckpt.data-00000-of-00001` and the
    `checkpoint` state file, as the official trainer leaves them. Dtypes are
    kept as given. Returns the checkpoint prefix.
    """
    import tensorflow as tf

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prefix = out / CHECKPOINT_NAME
    names = list(weights)
    tf.raw_ops.SaveV2(
        prefix=str(prefix),
        tensor_names=names,
        shape_and_slices=[""] * len(names),
        tensors=[weights[n] for n in names],
    )
    (out / "checkpoint").write_text(
        f'model_checkpoint_path: "{CHECKPOINT_NAME}"\nall_model_checkpoint_paths: "{CHECKPOINT_NAME}"\n'
    )
    return prefix


def write_synthetic_checkpoint(
    arch: str,
    out_dir: str | os.PathLike,
    *,
    num_classes: int = 1000,
    ema_only: bool = False,
    raw_only: bool = False,
    seed: int = 0,
    bn_name: str = "tpu_batch_normalization",
    prefix: str | None = None,
    optimizer_slots: bool = False,
    global_step: int = 1000,
    calibrate: bool = True,
    calibration_size: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write a random official-format checkpoint of `arch` to `out_dir`; returns `out_dir/model.ckpt`.

    `ema_only` writes only the `ExponentialMovingAverage` shadows (like the
    released L2 checkpoints), `raw_only` only the raw variables;
    `optimizer_slots` adds `<var>/RMSProp` and `<var>/RMSProp_1` for every
    trainable variable. `calibrate=False` skips the forward passes (fast, but
    activations are then not normalised); `calibration_size` defaults to the
    arch's resolution capped at 320 px.
    """
    import tensorflow as tf

    if ema_only and raw_only:
        raise UsageError("ema_only and raw_only exclude each other")
    if num_classes < 0:
        raise UsageError(f"num_classes must be >= 0, got {num_classes}")
    say = progress or (lambda _msg: None)
    spec = get_arch(arch)
    size = calibration_size or min(spec.resolution, MAX_CALIBRATION_SIZE)
    x = _normal([CALIBRATION_BATCH, size, size, 3], seed, "calibration", "input") if calibrate else None

    net = _make_network(spec.name, num_classes, bn_name, prefix, seed, say)
    say(f"drawing the EMA weights of {spec.name}" + (f", calibrating at {size} px" if calibrate else ""))
    ema = net.build(net.initial, x, fit_logits=True)
    raw = None
    if not ema_only:
        say("drawing the raw weights" + (", calibrating again" if calibrate else ""))
        raw = net.build(lambda name: _perturbed(name, ema[name], seed), x)

    out: dict[str, Any] = {}
    for name in net.shapes:
        if raw is not None:
            out[name] = raw.pop(name)
        if not raw_only:
            out[f"{name}/{EMA_SUFFIX}"] = ema[name]
        if optimizer_slots and not name.endswith(MOVING_STATS):
            out.update(_rmsprop_slots(name, ema[name], seed))
    out["global_step"] = tf.constant(global_step, tf.int64)
    say(f"writing {len(out)} tensors to {out_dir}")
    return write_checkpoint(out, out_dir)


def _stream(seed: int, name: str, purpose: str) -> list[int]:
    """A stateless-RNG seed pair unique to (seed, name, purpose)."""
    return [seed, zlib.crc32(f"{purpose}:{name}".encode())]


def _normal(shape, seed: int, name: str, purpose: str):
    import tensorflow as tf

    return tf.random.stateless_normal(shape, seed=_stream(seed, name, purpose))


def _perturbed(name: str, ema, seed: int):
    import tensorflow as tf

    return ema * tf.exp(RAW_NOISE * _normal(ema.shape, seed, name, "raw"))


def _rmsprop_slots(name: str, value, seed: int) -> dict[str, Any]:
    import tensorflow as tf

    scale = 1e-3 * tf.sqrt(tf.reduce_mean(tf.square(value)))
    rms = tf.square(scale * (1.0 + tf.abs(_normal(value.shape, seed, name, "rms"))))
    momentum = scale * _normal(value.shape, seed, name, "momentum")
    return {f"{name}/{RMSPROP_SUFFIXES[0]}": rms, f"{name}/{RMSPROP_SUFFIXES[1]}": momentum}


def _make_network(arch: str, num_classes: int, bn_name: str, prefix: str | None, seed: int, say: Callable[[str], None]):
    """The calibrating network; its class is made here so that TensorFlow is imported lazily."""
    import tensorflow as tf

    from effconv.models.tf_reference import ReferenceForward, official_variable_shapes

    class CalibratingNetwork(ReferenceForward):
        """The reference forward with variables drawn on first use and BN statistics measured."""

        def __init__(self) -> None:
            super().__init__(arch, num_classes, bn_name, prefix)
            self.shapes = official_variable_shapes(arch, num_classes, bn_name, self.prefix)
            self.residual_gammas = {
                self.names[f"blocks.{b.index}.project_bn.weight"] for b in blocks(arch) if b.has_residual
            }
            self.values: dict[str, tf.Tensor] = {}
            self.draw: Callable[[str], tf.Tensor] = self.initial
            self.calibrating = self.fit_logits = False

        def build(
            self, draw: Callable[[str], tf.Tensor], x: tf.Tensor | None, fit_logits: bool = False
        ) -> dict[str, tf.Tensor]:
            """Every variable, from `draw` except the BN statistics, which are measured on `x`."""
            self.values, self.draw = {}, draw
            if x is not None:
                self.calibrating, self.fit_logits = True, fit_logits
                try:
                    self.forward(x)
                finally:
                    self.calibrating = self.fit_logits = False
            values = {name: self.variable(name) for name in self.shapes}
            self.values = {}
            return values

        def variable(self, name: str) -> tf.Tensor:
            if name not in self.values:
                self.values[name] = self.draw(name)
            return self.values[name]

        def initial(self, name: str) -> tf.Tensor:
            shape = self.shapes[name]
            n = _normal(shape, seed, name, "init")
            leaf = name.rsplit("/", 1)[-1]
            if leaf == "gamma":
                scale = RESIDUAL_GAMMA if name in self.residual_gammas else 1.0
                return scale * tf.abs(1.0 + 0.2 * n)
            if leaf == "beta":
                return 0.2 * n
            if leaf == "moving_mean":  # only without calibration
                return 0.1 * n
            if leaf == "moving_variance":
                return tf.exp(0.2 * n)
            if leaf == "bias":
                return 0.1 * n
            if len(shape) == 2:  # head/dense; calibration rescales it to LOGITS_STD
                return n / shape[0] ** 0.5
            fan_in = shape[0] * shape[1] * (1 if leaf == "depthwise_kernel" else shape[2])
            if "/se/" in name:
                return n / fan_in**0.5
            # A conv feeding a BN: He init, with a few output channels made tiny.
            u = tf.random.stateless_uniform(shape[2:], seed=_stream(seed, name, "tiny"))
            column = tf.where(u < TINY_CHANNEL_FRACTION, TINY_CHANNEL_SCALE, 1.0)
            return n * (2.0 / fan_in) ** 0.5 * column

        def batch_norm(self, x: tf.Tensor, module: str) -> tf.Tensor:
            if self.calibrating:
                moving_mean = self.names[f"{module}.running_mean"]
                base = moving_mean.rsplit("/", 1)[0]  # the BN's official scope: seeds the noise
                mean, var = tf.nn.moments(x, axes=[0, 1, 2])
                noise = STAT_NOISE * _normal(mean.shape, seed, base, "mean")
                self.values[moving_mean] = mean + tf.sqrt(var) * noise
                self.values[self.names[f"{module}.running_var"]] = var * tf.exp(
                    STAT_NOISE * _normal(var.shape, seed, base, "var")
                )
            return super().batch_norm(x, module)

        def dense(self, x: tf.Tensor, module: str) -> tf.Tensor:
            logits = super().dense(x, module)
            if self.fit_logits and module == "classifier":  # not CondConv's routing layers
                self.values[self.names[f"{module}.weight"]] *= LOGITS_STD / tf.math.reduce_std(logits)
                logits = super().dense(x, module)
            return logits

        def block(self, x: tf.Tensor, b) -> tf.Tensor:
            if self.calibrating and (b.index == 0 or blocks(arch)[b.index - 1].stage != b.stage):
                say(f"  stage {b.stage + 1} (from block {b.index} of {len(blocks(arch))})")
            return super().block(x, b)

    return CalibratingNetwork()
