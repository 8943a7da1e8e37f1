"""TensorFlow 'SAME' padding, exact at any input size."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# (explicit F.pad amounts (left, right, top, bottom) or None, the convolution's own symmetric padding)
PaddingPlan = tuple[tuple[int, int, int, int] | None, tuple[int, int]]


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) padding TF's 'SAME' applies along one axis of length `size`."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """nn.Conv2d with TF 'SAME' padding.

    When the padding does not depend on the input size (stride 1, odd kernel) it
    is symmetric and handed to the convolution itself. Otherwise it is worked
    out from each input's height and width, so the layer is exact at every size:
    where it comes out symmetric (odd sizes at stride 2) the convolution still
    pads by itself, and only asymmetric padding (the extra pixel bottom/right,
    even sizes at stride 2) costs an explicit `F.pad` copy.

    `set_input_size(h, w)` works the plan out once for a known input size
    (saving the per-call arithmetic, and giving tracers and ONNX export a graph
    with constant padding); inputs of any other size still take the dynamic path.
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
        self.static_size: tuple[int, int] | None = None
        self._static_plan: PaddingPlan | None = None

    def pads_for(self, height: int, width: int) -> tuple[int, int, int, int]:
        """TF 'SAME' padding of an input of `height` x `width`, as F.pad's (left, right, top, bottom)."""
        top, bottom = same_padding(height, self.kernel_size[0], self.stride[0])
        left, right = same_padding(width, self.kernel_size[1], self.stride[1])
        return left, right, top, bottom

    def padding_plan(self, height: int, width: int) -> PaddingPlan:
        """How to apply the padding: symmetric amounts go to the convolution, the rest to F.pad."""
        left, right, top, bottom = self.pads_for(height, width)
        if left == right and top == bottom:
            return None, (top, left)
        return (left, right, top, bottom), (0, 0)

    def set_input_size(self, size: tuple[int, int] | None) -> None:
        """Fix the padding for inputs of `size` (height, width); None returns to fully dynamic."""
        if not self.dynamic_padding or size is None:
            self.static_size, self._static_plan = None, None
            return
        self.static_size = (int(size[0]), int(size[1]))
        self._static_plan = self.padding_plan(*self.static_size)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Spatial size of this layer's output for an input of `height` x `width` (TF 'SAME': ceil(n / s))."""
        return -(-height // self.stride[0]), -(-width // self.stride[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.dynamic_padding:
            return self._conv_forward(x, self.weight, self.bias)
        return self.conv_with(x, self.weight, self.groups)

    def conv_with(self, x: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
        """This layer's padding and stride around another kernel (CondConv's per-example kernels)."""
        size = (x.shape[-2], x.shape[-1])
        if not self.dynamic_padding:
            pads, padding = None, self.padding
        elif self._static_plan is not None and size == self.static_size:
            pads, padding = self._static_plan
        else:
            pads, padding = self.padding_plan(*size)
        if pads is not None:
            x = F.pad(x, pads)
        return F.conv2d(x, weight, self.bias, self.stride, padding, self.dilation, groups)


class SymmetricConv2d(nn.Conv2d):
    """nn.Conv2d padded by `kernel // 2` on every side, whatever the input size (the "symmetric" rule).

    It has SameConv2d's size interface, so that a model walks its convolutions alike under either rule.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, **kwargs):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, **kwargs)

    def set_input_size(self, size: tuple[int, int] | None) -> None:
        """Nothing to work out: the padding does not depend on the input size."""

    def conv_with(self, x: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
        """This layer's padding and stride around another kernel (CondConv's per-example kernels)."""
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, groups)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        return (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1


PaddedConv = SameConv2d | SymmetricConv2d
PADDING_RULES: dict[str, type[nn.Conv2d]] = {"tf-same": SameConv2d, "symmetric": SymmetricConv2d}


def padded_conv(rule: str, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, **kwargs):
    """A convolution padded by `rule` ("tf-same" or "symmetric")."""
    return PADDING_RULES[rule](in_channels, out_channels, kernel_size, stride, **kwargs)
