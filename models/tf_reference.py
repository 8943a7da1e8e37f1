"""Our own TensorFlow 2 forward pass of the official EfficientNet, weights taken by official name.

It is the TF side of every parity check, so it follows the official numerics
exactly: NHWC, TF 'SAME' padding (asymmetric for stride 2), BN in inference mode
with epsilon 1e-3, swish everywhere. The architecture comes from
`effconv.models.spec`; the variable names are built here, once, by
`layer_names` and `official_variable_shapes`.

Importing this module imports TensorFlow; nothing else in the package imports
it at module level.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from effconv.errors import MappingError
from effconv.models.spec import BN_EPS, BlockSpec, blocks, get_arch, head_channels, stem_channels

DEFAULT_BN_NAME = "tpu_batch_normalization"
BN_VARIABLES = ("gamma", "beta", "moving_mean", "moving_variance")


def default_prefix(arch: str) -> str:
    return f"efficientnet-{get_arch(arch).name}"


def _bn_scope(bn_name: str, n: int) -> str:
    # Keras-style layer naming: the n-th BN created inside a scope gets suffix _n.
    return bn_name if n == 0 else f"{bn_name}_{n}"


@dataclass(frozen=True)
class BlockNames:
    """Scope of every layer of one block, relative to the model prefix."""

    expand: str | None
    expand_bn: str | None
    depthwise: str
    depthwise_bn: str
    se_reduce: str
    se_expand: str
    project: str
    project_bn: str


def block_names(block: BlockSpec, bn_name: str = DEFAULT_BN_NAME) -> BlockNames:
    """Official scopes of a block; the suffixes follow creation order, so they shift without expand."""
    base = f"blocks_{block.index}"
    if block.has_expand:
        expand, expand_bn = f"{base}/conv2d", f"{base}/{_bn_scope(bn_name, 0)}"
        first_bn = 1
        project = f"{base}/conv2d_1"
    else:
        expand = expand_bn = None
        first_bn = 0
        project = f"{base}/conv2d"
    return BlockNames(
        expand=expand,
        expand_bn=expand_bn,
        depthwise=f"{base}/depthwise_conv2d",
        depthwise_bn=f"{base}/{_bn_scope(bn_name, first_bn)}",
        se_reduce=f"{base}/se/conv2d",
        se_expand=f"{base}/se/conv2d_1",
        project=project,
        project_bn=f"{base}/{_bn_scope(bn_name, first_bn + 1)}",
    )


def official_variable_shapes(
    arch: str,
    num_classes: int = 1000,
    bn_name: str = DEFAULT_BN_NAME,
    prefix: str | None = None,
) -> dict[str, tuple[int, ...]]:
    """Every model variable of `arch` under its official name, with its TF shape, in forward order.

    `num_classes=0` means no classification head (no `head/dense`).
    """
    p = default_prefix(arch) if prefix is None else prefix
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(scope: str, k: int, cin: int, cout: int) -> None:
        shapes[f"{p}/{scope}/kernel"] = (k, k, cin, cout)

    def bn(scope: str, c: int) -> None:
        for var in BN_VARIABLES:
            shapes[f"{p}/{scope}/{var}"] = (c,)

    def biased(scope: str, kernel: tuple[int, ...]) -> None:
        shapes[f"{p}/{scope}/kernel"] = kernel
        shapes[f"{p}/{scope}/bias"] = (kernel[-1],)

    stem = stem_channels(arch)
    conv("stem/conv2d", 3, 3, stem)
    bn(f"stem/{bn_name}", stem)
    for b in blocks(arch):
        n = block_names(b, bn_name)
        mid = b.mid_channels
        if b.has_expand:
            conv(n.expand, 1, b.in_channels, mid)
            bn(n.expand_bn, mid)
        shapes[f"{p}/{n.depthwise}/depthwise_kernel"] = (b.kernel, b.kernel, mid, 1)
        bn(n.depthwise_bn, mid)
        biased(n.se_reduce, (1, 1, mid, b.se_channels))
        biased(n.se_expand, (1, 1, b.se_channels, mid))
        conv(n.project, 1, mid, b.out_channels)
        bn(n.project_bn, b.out_channels)
    head = head_channels(arch)
    conv("head/conv2d", 1, blocks(arch)[-1].out_channels, head)
    bn(f"head/{bn_name}", head)
    if num_classes:
        biased("head/dense", (head, num_classes))
    return shapes


def swish(x: tf.Tensor) -> tf.Tensor:
    return x * tf.sigmoid(x)


class ReferenceForward:
    """The forward pass, written once against named layers.

    Subclasses decide where a variable comes from (`variable`) and may observe a
    BN's input before it is applied (`batch_norm`); the synthetic-checkpoint
    writer uses that to calibrate BN statistics layer by layer.
    """

    def __init__(self, arch: str, num_classes: int, bn_name: str = DEFAULT_BN_NAME, prefix: str | None = None):
        self.arch = get_arch(arch).name
        self.num_classes = num_classes
        self.bn_name = bn_name
        self.prefix = default_prefix(arch) if prefix is None else prefix

    def variable(self, name: str) -> tf.Tensor:
        """The tensor for official variable `name` (full name, prefix included)."""
        raise NotImplementedError

    def _var(self, scope: str, var: str) -> tf.Tensor:
        return self.variable(f"{self.prefix}/{scope}/{var}")

    def conv(self, x: tf.Tensor, scope: str, stride: int = 1) -> tf.Tensor:
        return tf.nn.conv2d(x, self._var(scope, "kernel"), strides=stride, padding="SAME")

    def depthwise(self, x: tf.Tensor, scope: str, stride: int) -> tf.Tensor:
        kernel = self._var(scope, "depthwise_kernel")
        return tf.nn.depthwise_conv2d(x, kernel, strides=[1, stride, stride, 1], padding="SAME")

    def batch_norm(self, x: tf.Tensor, scope: str) -> tf.Tensor:
        gamma, beta, mean, var = (self._var(scope, v) for v in BN_VARIABLES)
        y, _, _ = tf.compat.v1.nn.fused_batch_norm(x, gamma, beta, mean, var, epsilon=BN_EPS, is_training=False)
        return y

    def biased_conv(self, x: tf.Tensor, scope: str) -> tf.Tensor:
        return tf.nn.conv2d(x, self._var(scope, "kernel"), strides=1, padding="SAME") + self._var(scope, "bias")

    def dense(self, x: tf.Tensor, scope: str) -> tf.Tensor:
        return tf.matmul(x, self._var(scope, "kernel")) + self._var(scope, "bias")

    def block(self, x: tf.Tensor, b: BlockSpec) -> tf.Tensor:
        n = block_names(b, self.bn_name)
        h = x
        if b.has_expand:
            h = swish(self.batch_norm(self.conv(h, n.expand), n.expand_bn))
        h = swish(self.batch_norm(self.depthwise(h, n.depthwise, b.stride), n.depthwise_bn))
        s = tf.reduce_mean(h, axis=[1, 2], keepdims=True)
        s = swish(self.biased_conv(s, n.se_reduce))
        h = h * tf.sigmoid(self.biased_conv(s, n.se_expand))
        h = self.batch_norm(self.conv(h, n.project), n.project_bn)
        if b.has_residual:
            h = h + x
        return h

    def forward(self, x: tf.Tensor, endpoints: bool = False) -> tf.Tensor | dict[str, tf.Tensor]:
        out: dict[str, tf.Tensor] = {}
        h = swish(self.batch_norm(self.conv(x, "stem/conv2d", 2), f"stem/{self.bn_name}"))
        out["stem"] = h
        for b in blocks(self.arch):
            h = self.block(h, b)
            out[f"block_{b.index}"] = h
        out["features"] = h
        h = swish(self.batch_norm(self.conv(h, "head/conv2d"), f"head/{self.bn_name}"))
        out["head_1x1"] = h
        h = tf.reduce_mean(h, axis=[1, 2])
        out["pooled_features"] = h
        if self.num_classes:
            h = self.dense(h, "head/dense")
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
            num_classes = _infer_num_classes(weights, f"{p}/head/dense/kernel")
        super().__init__(arch, num_classes, bn_name, p)
        self._weights: dict[str, tf.Tensor] = {}
        for name, shape in official_variable_shapes(arch, num_classes, bn_name, p).items():
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


def _infer_num_classes(weights: Mapping[str, np.ndarray], dense_kernel: str) -> int:
    try:
        kernel = weights[dense_kernel]
    except KeyError:
        return 0
    shape = np.shape(kernel)
    if len(shape) != 2:
        raise MappingError(f"weight {dense_kernel!r} has shape {list(shape)}, expected [channels, classes]")
    return int(shape[1])
