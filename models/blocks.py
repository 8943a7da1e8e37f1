"""The PyTorch blocks, one class per block kind, each built from one `BlockSpec` row.

`BLOCKS` maps a kind to its class; the model builds every block through it. A block knows its
own insides: which of its convolutions are padded by the padding rule (`padded_convs`, in the
order the input flows through them). Module names are the canonical tensor names that every
mapping and layout table refers to.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from effconv.models.family import BlockSpec
from effconv.models.same_padding import PaddedConv, padded_conv

ACTIVATIONS: dict[str, type[nn.Module]] = {"swish": nn.SiLU, "relu6": nn.ReLU6, "relu": nn.ReLU}


def activation(name: str) -> nn.Module:
    return ACTIVATIONS[name](inplace=True)


def batch_norm(channels: int, eps: float, momentum: float) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=eps, momentum=momentum)


class ConvBNAct(nn.Module):
    """Convolution, batch norm, activation: the stem and the head conv."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int,
        stride: int,
        *,
        act: str,
        bn_eps: float,
        bn_momentum: float,
        padding: str,
    ):
        super().__init__()
        self.conv = padded_conv(padding, cin, cout, kernel, stride, bias=False)
        self.bn = batch_norm(cout, bn_eps, bn_momentum)
        self.act = activation(act)  # on the fresh BN output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int, act: str):
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        s = self.expand(self.act(self.reduce(s)))
        return x * torch.sigmoid(s)


class MBConv(nn.Module):
    """Mobile inverted bottleneck: [1x1 expand, BN, act] -> depthwise, BN, act -> [SE] -> 1x1 project, BN."""

    def __init__(self, block: BlockSpec):
        super().__init__()
        mid = block.mid_channels
        self.has_residual = block.has_residual
        self.has_expand = block.has_expand

        def conv(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> PaddedConv:
            return padded_conv(block.padding, cin, cout, kernel, stride, groups=groups, bias=False)

        def bn(channels: int) -> nn.BatchNorm2d:
            return batch_norm(channels, block.bn_eps, block.bn_momentum)

        if block.has_expand:
            self.expand_conv = conv(block.in_channels, mid, 1)
            self.expand_bn = bn(mid)
        self.dw_conv = conv(mid, mid, block.kernel, block.stride, groups=mid)
        self.dw_bn = bn(mid)
        self.se = SqueezeExcite(mid, block.se_channels, block.activation) if block.has_se else nn.Identity()
        self.project_conv = conv(mid, block.out_channels, 1)
        self.project_bn = bn(block.out_channels)
        self.act = activation(block.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.has_expand:
            y = self.act(self.expand_bn(self.expand_conv(y)))
        y = self.act(self.dw_bn(self.dw_conv(y)))
        y = self.project_bn(self.project_conv(self.se(y)))
        return y + x if self.has_residual else y

    def padded_convs(self) -> list[PaddedConv]:
        convs = [self.expand_conv] if self.has_expand else []
        return [*convs, self.dw_conv, self.project_conv]


class EdgeResidual(nn.Module):
    """Edge residual (official `MBConvBlockWithoutDepthwise`): k x k full expand conv, BN, act -> 1x1 project, BN.

    The expand conv reads the block's actual input and gives nominal input x expand channels; there is
    no depthwise conv and no squeeze-excite. Only blocks with an expand step exist (EdgeTPU's expand 4, 8).
    """

    def __init__(self, block: BlockSpec):
        super().__init__()
        if not block.has_expand:
            raise ValueError(f"block {block.index}: an edge residual block needs an expand ratio other than 1")
        self.has_residual = block.has_residual

        def conv(cin: int, cout: int, kernel: int, stride: int = 1) -> PaddedConv:
            return padded_conv(block.padding, cin, cout, kernel, stride, bias=False)

        def bn(channels: int) -> nn.BatchNorm2d:
            return batch_norm(channels, block.bn_eps, block.bn_momentum)

        self.expand_conv = conv(block.in_channels, block.mid_channels, block.kernel, block.stride)
        self.expand_bn = bn(block.mid_channels)
        self.project_conv = conv(block.mid_channels, block.out_channels, 1)
        self.project_bn = bn(block.out_channels)
        self.act = activation(block.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.expand_bn(self.expand_conv(x)))
        y = self.project_bn(self.project_conv(y))
        return y + x if self.has_residual else y

    def padded_convs(self) -> list[PaddedConv]:
        return [self.expand_conv, self.project_conv]


class FusedMBConv(EdgeResidual):
    """EfficientNetV2's fused MBConv: an edge residual block, or without expansion one k x k conv, BN, act.

    Without the expand step the block's only conv carries the kernel and the stride (official `conv2d`,
    here `project_conv`), and the activation follows its BN: the one block whose output is activated.
    """

    def __init__(self, block: BlockSpec):
        if block.has_expand:
            super().__init__(block)
            self.has_expand = True
            return
        nn.Module.__init__(self)
        self.has_expand = False
        self.has_residual = block.has_residual
        self.project_conv = padded_conv(
            block.padding, block.in_channels, block.out_channels, block.kernel, block.stride, bias=False
        )
        self.project_bn = batch_norm(block.out_channels, block.bn_eps, block.bn_momentum)
        self.act = activation(block.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.has_expand:
            return super().forward(x)
        y = self.act(self.project_bn(self.project_conv(x)))
        return y + x if self.has_residual else y

    def padded_convs(self) -> list[PaddedConv]:
        return super().padded_convs() if self.has_expand else [self.project_conv]


class ExpertConv(nn.Module):
    """A conditionally parameterised convolution (CondConv): per example, the routing-weighted sum of its experts.

    `weight` holds one flattened PyTorch kernel per expert, [experts, out * in / groups * k * k] (as timm's
    CondConv2d). The padding and stride are those of an ordinary padded conv of the same geometry
    (`geometry`, which holds no weights); the examples of a batch run as groups of one convolution.
    """

    def __init__(self, rule: str, cin: int, cout: int, kernel: int, stride: int, experts: int, groups: int = 1):
        super().__init__()
        self.shape = (cout, cin // groups, kernel, kernel)
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(experts, math.prod(self.shape)))
        for expert in self.weight.data:
            nn.init.kaiming_uniform_(expert.view(self.shape), a=math.sqrt(5))
        self.geometry = padded_conv(rule, cin, cout, kernel, stride, groups=groups, bias=False, device="meta")
        self.geometry.register_parameter("weight", None)

    def forward(self, x: torch.Tensor, routing: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        kernels = (routing @ self.weight).view(batch * self.shape[0], *self.shape[1:])
        y = self.geometry.conv_with(x.reshape(1, -1, *x.shape[2:]), kernels, self.groups * batch)
        return y.view(batch, self.shape[0], *y.shape[2:])


class CondConvMBConv(nn.Module):
    """MBConv whose expand, depthwise and project convs are CondConv layers sharing one routing.

    The routing weights, sigmoid(dense(mean of the block input)), are computed once per example from the
    block's input; squeeze-excite and batch norms are MBConv's.
    """

    def __init__(self, block: BlockSpec):
        super().__init__()
        if not block.has_expand or block.experts < 1:
            raise ValueError(f"block {block.index}: a CondConv block needs experts and an expand ratio other than 1")
        mid, experts = block.mid_channels, block.experts
        self.has_residual = block.has_residual

        def bn(channels: int) -> nn.BatchNorm2d:
            return batch_norm(channels, block.bn_eps, block.bn_momentum)

        self.routing = nn.Linear(block.in_channels, experts)
        self.expand_conv = ExpertConv(block.padding, block.in_channels, mid, 1, 1, experts)
        self.expand_bn = bn(mid)
        self.dw_conv = ExpertConv(block.padding, mid, mid, block.kernel, block.stride, experts, groups=mid)
        self.dw_bn = bn(mid)
        self.se = SqueezeExcite(mid, block.se_channels, block.activation) if block.has_se else nn.Identity()
        self.project_conv = ExpertConv(block.padding, mid, block.out_channels, 1, 1, experts)
        self.project_bn = bn(block.out_channels)
        self.act = activation(block.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = torch.sigmoid(self.routing(x.mean((2, 3))))
        y = self.act(self.expand_bn(self.expand_conv(x, routing)))
        y = self.act(self.dw_bn(self.dw_conv(y, routing)))
        y = self.project_bn(self.project_conv(self.se(y), routing))
        return y + x if self.has_residual else y

    def padded_convs(self) -> list[PaddedConv]:
        return [self.expand_conv.geometry, self.dw_conv.geometry, self.project_conv.geometry]


BLOCKS: dict[str, type[nn.Module]] = {
    "mbconv": MBConv,
    "edge_residual": EdgeResidual,
    "fused_mbconv": FusedMBConv,
    "condconv_mbconv": CondConvMBConv,
}
