"""TensorFlow 'SAME' padding, exact at any input size."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) padding TF's 'SAME' applies along one axis of length `size`."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """nn.Conv2d with TF 'SAME' padding.

    When the padding does not depend on the input size (stride 1, odd kernel) it
    is symmetric and handed to the convolution itself; otherwise it is computed
    from each input's height and width, so the layer is exact at every size.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, **kwargs):
        static = stride == 1 and kernel_size % 2 == 1
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2 if static else 0,
            **kwargs,
        )
        self.dynamic_padding = not static

    def pads_for(self, height: int, width: int) -> tuple[int, int, int, int]:
        top, bottom = same_padding(height, self.kernel_size[0], self.stride[0])
        left, right = same_padding(width, self.kernel_size[1], self.stride[1])
        return left, right, top, bottom

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_padding:
            pads = self.pads_for(x.shape[-2], x.shape[-1])
            if any(pads):
                x = F.pad(x, pads)
        return super().forward(x)
