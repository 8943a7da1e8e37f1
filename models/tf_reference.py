"""Our own TensorFlow 2 forward pass of the official EfficientNet, weights taken by official name.

It is the TF side of every parity check, so it follows the official numerics
exactly: NHWC, the family's padding (TF 'SAME', asymmetric for stride 2), BN in
inference mode with the family's epsilon, the family's activation. The
architecture comes from `effconv.models.spec`; each block is computed by the
function its kind names (`TF_BLOCKS`). Layers are addressed by their canonical
module names (as in the PyTorch model); the official variable behind each comes
from the mapping plan (`effconv.mappings.engine.official_plan`), so no name is
derived here a second time.

Importing this module imports TensorFlow; nothing else in the package imports
it at module level.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

import numpy as np
import tensorflow as tf

from effconv.errors import MappingError
from effconv.mappings import engine
from effconv.models import spec
from effconv.models.family import BlockSpec

DEFAULT_BN_NAME = "tpu_batch_normalization"
BN_TENSORS = ("weight", "bias", "running_mean", "running_var")  # gamma, beta, moving_mean, moving_variance


def default_prefix(arch: str) -> str:
    return spec.official_name(arch)


def official_variable_shapes(
    arch: str,
    num_classes: int = 1000,
    bn_name: str = DEFAULT_BN_NAME,
    prefix: str | None = None,
    names: Collection[str] | None = None,
) -> dict[str, tuple[int, ...]]:
    """Every model variable of `arch` under its official name, with its TF shape, in forward order.

    `num_classes=0` means no classification head (no `head/dense`); `names` as in `engine.official_plan`.
    """
    p = default_prefix(arch) if prefix is None else prefix
    return engine.source_shapes(engine.official_plan(arch, num_classes, p, bn_name, names), arch, num_classes)


ACTIVATIONS: dict[str, Callable[[tf.Tensor], tf.Tensor]] = {
    "swish": lambda x: x * tf.sigmoid(x),
    "relu6": tf.nn.relu6,
    "relu": tf.nn.relu,
}


def _mbconv(net: ReferenceForward, x: tf.Tensor, b: BlockSpec, scope: str) -> tf.Tensor:
    act = ACTIVATIONS[b.activation]
    h = x
    if b.has_expand:
        h = act(net.batch_norm(net.conv(h, f"{scope}.expand_conv"), f"{scope}.expand_bn"))
    h = act(net.batch_norm(net.depthwise(h, f"{scope}.dw_conv", b.stride), f"{scope}.dw_bn"))
    if b.has_se:
        s = tf.reduce_mean(h, axis=[1, 2], keepdims=True)
        s = act(net.biased_conv(s, f"{scope}.se.reduce"))
        h = h * tf.sigmoid(net.biased_conv(s, f"{scope}.se.expand"))
    h = net.batch_norm(net.conv(h, f"{scope}.project_conv"), f"{scope}.project_bn")
    if b.has_residual:
        h = h + x
    return h


def _edge_residual(net: ReferenceForward, x: tf.Tensor, b: BlockSpec, scope: str) -> tf.Tensor:
    act = ACTIVATIONS[b.activation]
    h = act(net.batch_norm(net.conv(x, f"{scope}.expand_conv", b.stride), f"{scope}.expand_bn"))
    h = net.batch_norm(net.conv(h, f"{scope}.project_conv"), f"{scope}.project_bn")
    if b.has_residual:
        h = h + x
    return h


def _fused_mbconv(net: ReferenceForward, x: tf.Tensor, b: BlockSpec, scope: str) -> tf.Tensor:
    if b.has_expand:
        return _edge_residual(net, x, b, scope)
    h = ACTIVATIONS[b.activation](net.batch_norm(net.conv(x, f"{scope}.project_conv", b.stride), f"{scope}.project_bn"))
    if b.has_residual:
        h = h + x
    return h


def _condconv_mbconv(net: ReferenceForward, x: tf.Tensor, b: BlockSpec, scope: str) -> tf.Tensor:
    act = ACTIVATIONS[b.activation]
    routing = tf.sigmoid(net.dense(tf.reduce_mean(x, axis=[1, 2]), f"{scope}.routing"))
    h = net.expert_conv(x, f"{scope}.expand_conv", routing, [1, 1, b.in_channels, b.mid_channels])
    h = act(net.batch_norm(h, f"{scope}.expand_bn"))
    h = net.expert_conv(h, f"{scope}.dw_conv", routing, [b.kernel, b.kernel, b.mid_channels, 1], b.stride, True)
    h = act(net.batch_norm(h, f"{scope}.dw_bn"))
    if b.has_se:
        s = tf.reduce_mean(h, axis=[1, 2], keepdims=True)
        s = act(net.biased_conv(s, f"{scope}.se.reduce"))
        h = h * tf.sigmoid(net.biased_conv(s, f"{scope}.se.expand"))
    h = net.expert_conv(h, f"{scope}.project_conv", routing, [1, 1, b.mid_channels, b.out_channels])
    h = net.batch_norm(h, f"{scope}.project_bn")
    if b.has_residual:
        h = h + x
    return h


# Block kind -> its forward; each takes (network, input, block row, canonical scope "blocks.N").
TF_BLOCKS: dict[str, Callable[[ReferenceForward, tf.Tensor, BlockSpec, str], tf.Tensor]] = {
    "mbconv": _mbconv,
    "edge_residual": _edge_residual,
    "fused_mbconv": _fused_mbconv,
    "condconv_mbconv": _condconv_mbconv,
}


class ReferenceForward:
    """The forward pass, written once against canonical layer names.

    Subclasses decide where a variable comes from (`variable`, by official name) and may
    observe a BN's input before it is applied (`batch_norm`); the synthetic-checkpoint
    writer uses that to calibrate BN statistics layer by layer.
    """

    def __init__(
        self,
        arch: str,
        num_classes: int,
        bn_name: str = DEFAULT_BN_NAME,
        prefix: str | None = None,
        names: Collection[str] | None = None,
    ):
        self.arch = spec.get_arch(arch).name
        self.family = spec.family_of(self.arch)
        self.num_classes = num_classes
        self.bn_name = bn_name
        self.prefix = default_prefix(arch) if prefix is None else prefix
        # `names`: the variable names at hand, among which model-wide numbered layers are found
        plan = engine.official_plan(self.arch, num_classes, self.prefix, bn_name, names)
        self.names: dict[str, str] = {m.target: m.source for m in plan}  # canonical tensor -> official variable
        self.act = ACTIVATIONS[self.family.activation]

    def variable(self, name: str) -> tf.Tensor:
        """The tensor for official variable `name` (full name, prefix included)."""
        raise NotImplementedError

    def tensor(self, name: str) -> tf.Tensor:
        """The variable behind canonical tensor `name` (e.g. `blocks.3.dw_conv.weight`), in TF layout."""
        return self.variable(self.names[name])

    def _padded(self, x: tf.Tensor, kernel: int, stride: int) -> tuple[tf.Tensor, str]:
        if self.family.padding == "tf-same":
            return x, "SAME"
        p = kernel // 2
        return tf.pad(x, [[0, 0], [p, p], [p, p], [0, 0]]), "VALID"

    def conv(self, x: tf.Tensor, module: str, stride: int = 1) -> tf.Tensor:
        kernel = self.tensor(f"{module}.weight")
        x, padding = self._padded(x, int(kernel.shape[0]), stride)
        return tf.nn.conv2d(x, kernel, strides=stride, padding=padding)

    def depthwise(self, x: tf.Tensor, module: str, stride: int) -> tf.Tensor:
        kernel = self.tensor(f"{module}.weight")
        x, padding = self._padded(x, int(kernel.shape[0]), stride)
        return tf.nn.depthwise_conv2d(x, kernel, strides=[1, stride, stride, 1], padding=padding)

    def batch_norm(self, x: tf.Tensor, module: str) -> tf.Tensor:
        gamma, beta, mean, var = (self.tensor(f"{module}.{t}") for t in BN_TENSORS)
        y, _, _ = tf.compat.v1.nn.fused_batch_norm(
            x, gamma, beta, mean, var, epsilon=self.family.bn_eps, is_training=False
        )
        return y

    def expert_conv(
        self, x: tf.Tensor, module: str, routing: tf.Tensor, shape: list[int], stride: int = 1, depthwise=False
    ) -> tf.Tensor:
        """A CondConv layer: per example, the kernel `routing @ experts` reshaped to `shape` (TF layout)."""
        kernels = tf.matmul(routing, self.tensor(f"{module}.weight"))  # [batch, flat kernel]
        x, padding = self._padded(x, shape[0], stride)

        def one(args):
            xi, kernel = args
            kernel = tf.reshape(kernel, shape)
            if depthwise:
                return tf.nn.depthwise_conv2d(xi[None], kernel, [1, stride, stride, 1], padding)[0]
            return tf.nn.conv2d(xi[None], kernel, stride, padding)[0]

        return tf.map_fn(one, (x, kernels), fn_output_signature=tf.float32)

    def biased_conv(self, x: tf.Tensor, module: str) -> tf.Tensor:
        kernel = self.tensor(f"{module}.weight")
        return tf.nn.conv2d(x, kernel, strides=1, padding="SAME") + self.tensor(f"{module}.bias")

    def dense(self, x: tf.Tensor, module: str) -> tf.Tensor:
        return tf.matmul(x, self.tensor(f"{module}.weight")) + self.tensor(f"{module}.bias")

    def block(self, x: tf.Tensor, b: BlockSpec) -> tf.Tensor:
        return TF_BLOCKS[b.kind](self, x, b, f"{engine.official.BLOCK_TARGET.format(index=b.index)}")

    def forward(self, x: tf.Tensor, endpoints: bool = False) -> tf.Tensor | dict[str, tf.Tensor]:
        out: dict[str, tf.Tensor] = {}
        h = self.act(self.batch_norm(self.conv(x, "stem.conv", 2), "stem.bn"))
        out["stem"] = h
        for b in spec.blocks(self.arch):
            h = self.block(h, b)
            out[f"block_{b.index}"] = h
        out["features"] = h
        h = self.act(self.batch_norm(self.conv(h, "head.conv"), "head.bn"))
        out["head_1x1"] = h
        h = tf.reduce_mean(h, axis=[1, 2])
        out["pooled_features"] = h
        if self.num_classes:
            h = self.dense(h, "classifier")
            out["logits"] = h
        return out if endpoints else h


class TFReferenceModel(ReferenceForward):
    """Official EfficientNet forward in TF2 from a `{official name: array}` mapping.

    `weights` may hold more than the model needs (EMA shadows, optimizer slots,
    global_step): only the base names are read, so the caller picks EMA or raw
    values by what it puts under those names.
    """

    def __init__(
        self,
        arch: str,
        weights: Mapping[str, np.ndarray],
        num_classes: int | None = None,
        bn_name: str = DEFAULT_BN_NAME,
        prefix: str | None = None,
    ):
        p = default_prefix(arch) if prefix is None else prefix
        if num_classes is None:
            num_classes = _infer_num_classes(weights, engine.official_plan(arch, 1, p, bn_name, list(weights)))
        names = list(weights)
        super().__init__(arch, num_classes, bn_name, p, names)
        self._weights: dict[str, tf.Tensor] = {}
        for name, shape in official_variable_shapes(arch, num_classes, bn_name, p, names).items():
            try:
                value = weights[name]
            except KeyError:
                raise MappingError(f"{self.arch}: weight {name!r} is missing") from None
            value = np.asarray(value, dtype=np.float32)
            if value.shape != shape:
                raise MappingError(
                    f"{self.arch}: weight {name!r} has shape {list(value.shape)}, expected {list(shape)}"
                )
            self._weights[name] = tf.constant(value)
        signature = [tf.TensorSpec([None, None, None, 3], tf.float32)]
        self._logits_fn = tf.function(lambda x: self.forward(x), input_signature=signature)
        self._endpoints_fn = tf.function(lambda x: self.forward(x, True), input_signature=signature)

    def variable(self, name: str) -> tf.Tensor:
        return self._weights[name]

    def __call__(self, x_nhwc: np.ndarray, endpoints: bool = False) -> np.ndarray | dict[str, np.ndarray]:
        x = np.asarray(x_nhwc, dtype=np.float32)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected an NHWC batch with 3 channels, got shape {x.shape}")
        if endpoints:
            return {k: v.numpy() for k, v in self._endpoints_fn(tf.constant(x)).items()}
        return self._logits_fn(tf.constant(x)).numpy()


def _infer_num_classes(weights: Mapping[str, np.ndarray], plan) -> int:
    dense_kernel = next(m.source for m in plan if m.target == "classifier.weight")
    try:
        kernel = weights[dense_kernel]
    except KeyError:
        return 0
    shape = np.shape(kernel)
    if len(shape) != 2:
        raise MappingError(f"weight {dense_kernel!r} has shape {list(shape)}, expected [channels, classes]")
    return int(shape[1])
