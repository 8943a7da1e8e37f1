"""The PyTorch blocks, one class per block kind, each built from one `BlockSpec` row.

`BLOCKS` maps a kind to its class; the model builds every block through it. A block knows its
own insides: which of its convolutions are padded by the padding rule (`padded_convs`, in the
order the input flows through them). Module names are the canonical tensor names that every
mapping and layout table refers to.
"""

from __future__ import annotations

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


BLOCKS: dict[str, type[nn.Module]] = {"mbconv": MBConv, "edge_residual": EdgeResidual}
