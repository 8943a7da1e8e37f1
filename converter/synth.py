"""Synthetic checkpoints in the official trainer's format, for any architecture.

The released checkpoints are large and downloaded; tests and benchmarks need
the same layout (official names and shapes, raw + `ExponentialMovingAverage`
shadows, `global_step`, optionally RMSProp slots) for every arch, offline.
Weights are random but well scaled: He-style kernels, and BN moving statistics
calibrated layer by layer on a seeded N(0, 1) batch run through our TF reference
forward, so activations neither vanish nor explode and logits have std O(1).

A few channels of every BN get a ~1e4 times smaller input (and so moving
variance), like real checkpoints: a wrong BN epsilon shows up on them at once.

TensorFlow is imported inside the functions: `import effconv.synth` is cheap.
Every random draw is a stateless function of (seed, variable name, purpose),
so the output does not depend on the order in which variables are made.
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

CALIBRATION_BATCH = int(__import__("os").environ.get("CB", 2))
MAX_CALIBRATION_SIZE = int(
    __import__("os").environ.get("CS", 128)
)  # px; BN statistics hardly depend on it, the cost does
LOGITS_STD = 2.0  # the official fixture's random model has ~2.2
TINY_CHANNEL_FRACTION = 0.01
TINY_CHANNEL_SCALE = 1e-2  # on the kernel, so 1e-4 on the variance
RAW_NOISE = float(__import__("os").environ.get("RN", 0.1))
RESIDUAL_GAMMA = float(__import__("os").environ.get("RG", 0.25))
STAT_NOISE = float(__import__("os").environ.get("SN", 0.05))


def write_checkpoint(weights: Mapping[str, Any], out_dir: str | os.PathLike) -> Path:
    """Write `weights` ({name: array or tf tensor}) as a TF checkpoint `out_dir/model.ckpt`.

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

    The EMA shadows hold the calibrated weights; the raw variables hold the
    same plus noise, so the two give clearly different logits. `ema_only`
    writes only the shadows (like the released L2 checkpoints), `raw_only`
    only the raw variables. `optimizer_slots` adds `<var>/RMSProp{,_1}` for
    every trainable variable.
    """
    import tensorflow as tf

    if ema_only and raw_only:
        raise UsageError("ema_only and raw_only exclude each other")
    if num_classes < 0:
        raise UsageError(f"num_classes must be >= 0, got {num_classes}")
    say = progress or (lambda _msg: None)
    spec = get_arch(arch)
    size = calibration_size or min(spec.resolution, MAX_CALIBRATION_SIZE)

    net = _make_network(spec.name, num_classes, bn_name, prefix, seed, say)
    x = _normal([CALIBRATION_BATCH, size, size, 3], seed, "calibration", "input") if calibrate else None
    if calibrate:
        say(f"calibrating {spec.name} on {CALIBRATION_BATCH}x{size}x{size}")
    ema = net.build(net.initial, x, fit_logits=True)
    # Raw = EMA plus noise on the trainable weights, with BN statistics calibrated
    # for those weights again: a self-consistent network, not a broken one.
    raw = None if ema_only else net.build(lambda name: _perturbed(name, ema[name], seed), x)

    out: dict[str, Any] = {}
    for name in net.shapes:
        if raw is not None:
            out[name] = raw.pop(name)
        if not raw_only:
            out[f"{name}/{EMA_SUFFIX}"] = ema[name]
        if optimizer_slots and not name.endswith(MOVING_STATS):
            out.update(_rmsprop_slots(name, ema[name], seed))
    out["global_step"] = tf.constant(global_step, tf.int64)
    del ema, raw, net
    say(f"writing {len(out)} tensors to {out_dir}")
    return write_checkpoint(out, out_dir)


def _stream(seed: int, name: str, purpose: str) -> list[int]:
    """A stateless-RNG seed pair unique to (seed, name, purpose)."""
    return [seed, zlib.crc32(f"{purpose}:{name}".encode())]


def _normal(shape, seed: int, name: str, purpose: str):
    import tensorflow as tf

    return tf.random.stateless_normal(shape, seed=_stream(seed, name, purpose))


def _rms(value):
    import tensorflow as tf

    return tf.sqrt(tf.reduce_mean(tf.square(value)))


def _perturbed(name: str, ema, seed: int):
    import tensorflow as tf

    return ema * tf.exp(RAW_NOISE * _normal(ema.shape, seed, name, "raw"))


def _rmsprop_slots(name: str, value, seed: int) -> dict[str, Any]:
    import tensorflow as tf

    scale = 1e-3 * _rms(value)
    rms = tf.square(scale * (1.0 + tf.abs(_normal(value.shape, seed, name, "rms"))))
    momentum = scale * _normal(value.shape, seed, name, "momentum")
    return {f"{name}/{RMSPROP_SUFFIXES[0]}": rms, f"{name}/{RMSPROP_SUFFIXES[1]}": momentum}


def _make_network(arch: str, num_classes: int, bn_name: str, prefix: str | None, seed: int, say: Callable[[str], None]):
    """The calibrating network; a class built on first use so that TensorFlow is imported lazily."""
    import tensorflow as tf

    from effconv.models.tf_reference import ReferenceForward, block_names, official_variable_shapes

    class CalibratingNetwork(ReferenceForward):
        """The reference forward whose variables are drawn on first use and whose BNs calibrate."""

        def __init__(self) -> None:
            super().__init__(arch, num_classes, bn_name, prefix)
            self.shapes = official_variable_shapes(arch, num_classes, bn_name, self.prefix)
            self.num_blocks = len(blocks(arch))
            self.residual_gammas = {
                f"{self.prefix}/{block_names(b, bn_name).project_bn}/gamma"
                for b in blocks(arch)
                if b.has_residual
            }
            self.values: dict[str, tf.Tensor] = {}
            self.draw: Callable[[str], tf.Tensor] = self.initial
            self.calibrating = self.fit_logits = False

        def build(
            self, draw: Callable[[str], tf.Tensor], x: tf.Tensor | None, fit_logits: bool = False
        ) -> dict[str, tf.Tensor]:
            """Every variable, drawn by `draw` except the BN statistics, which are measured on `x`."""
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
            if leaf == "moving_mean":  # only reached without calibration
                return 0.1 * n
            if leaf == "moving_variance":
                return tf.exp(0.2 * n)
            if leaf == "bias":
                return 0.1 * n
            if len(shape) == 2:  # head/dense; calibration rescales it to the target logits std
                return n / (shape[0] ** 0.5)
            fan_in = shape[0] * shape[1] * (1 if leaf == "depthwise_kernel" else shape[2])
            if "/se/" in name:
                return n / (fan_in**0.5)
            # Conv feeding a BN: He init, and a few output channels scaled down.
            tiny = tf.random.stateless_uniform(shape[2:], seed=_stream(seed, name, "tiny"))
            column = tf.where(tiny < TINY_CHANNEL_FRACTION, TINY_CHANNEL_SCALE, 1.0)
            return n * (2.0 / fan_in) ** 0.5 * column

        def batch_norm(self, x: tf.Tensor, scope: str) -> tf.Tensor:
            if self.calibrating:
                base = f"{self.prefix}/{scope}"
                mean, var = tf.nn.moments(x, axes=[0, 1, 2])
                self.values[f"{base}/moving_mean"] = mean + STAT_NOISE * tf.sqrt(var) * _normal(
                    mean.shape, seed, base, "mean"
                )
                self.values[f"{base}/moving_variance"] = var * tf.exp(
                    STAT_NOISE * _normal(var.shape, seed, base, "var")
                )
            return super().batch_norm(x, scope)

        def dense(self, x: tf.Tensor, scope: str) -> tf.Tensor:
            logits = super().dense(x, scope)
            if self.fit_logits:
                kernel = f"{self.prefix}/{scope}/kernel"
                self.values[kernel] *= LOGITS_STD / tf.math.reduce_std(logits)
                logits = super().dense(x, scope)
            return logits

        def block(self, x: tf.Tensor, b) -> tf.Tensor:
            if self.calibrating:
                say(f"block {b.index + 1}/{self.num_blocks}")
            return super().block(x, b)

    return CalibratingNetwork()
