"""The PyTorch EfficientNet of every family, built from the architecture table (NCHW, normalised input)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import nn

from effconv.errors import UsageError
from effconv.models import spec
from effconv.models.blocks import BLOCKS, ConvBNAct
from effconv.models.same_padding import PaddedConv


class EfficientNet(nn.Module):
    """An EfficientNet of any registered family, with its family's BN settings and padding rule.

    Each block is built by the class its kind names (`effconv.models.blocks.BLOCKS`).
    `num_classes=0` builds a feature extractor without the dense layer.
    """

    def __init__(self, arch: str, num_classes: int = 1000):
        super().__init__()
        self.arch = spec.get_arch(arch).name
        self.num_classes = num_classes
        family = spec.family_of(self.arch)
        block_specs = spec.blocks(self.arch)
        self.stage_ends = spec.stage_ends(self.arch)
        self.input_size: tuple[int, int] | None = None  # see set_input_size
        common = dict(
            act=family.activation, bn_eps=family.bn_eps, bn_momentum=family.bn_momentum, padding=family.padding
        )
        self.stem = ConvBNAct(3, spec.stem_channels(self.arch), 3, 2, **common)
        self.blocks = nn.ModuleList(BLOCKS[b.kind](b) for b in block_specs)
        self.head = ConvBNAct(block_specs[-1].out_channels, spec.head_channels(self.arch), 1, 1, **common)
        self.dropout = nn.Dropout(spec.get_arch(self.arch).dropout)
        if num_classes:
            self.classifier = nn.Linear(spec.head_channels(self.arch), num_classes)

    def forward_endpoints(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every intermediate output, named like the official endpoints."""
        out = {"stem": self.stem(x)}
        y = out["stem"]
        for i, block in enumerate(self.blocks):
            y = out[f"block_{i}"] = block(y)
        out["features"] = y
        out["head_1x1"] = self.head(y)
        out["pooled_features"] = out["head_1x1"].mean((2, 3))
        if self.num_classes:
            out["logits"] = self.classifier(out["pooled_features"])
        return out

    def stage_names(self) -> list[str]:
        """Names of the `extract_feat` outputs, by index: `stem`, `stage1`..`stage7`, `head`."""
        return ["stem"] + [f"stage{i + 1}" for i in range(len(self.stage_ends))] + ["head"]

    def extract_feat(self, x: torch.Tensor, out_indices: Sequence[int] | None = None) -> tuple[torch.Tensor, ...]:
        """Outputs of the stem (index 0), of each of the 7 stages (1-7) and of the head conv (8).

        `out_indices` picks some of them, as mmpretrain's EfficientNet backbone does (negative ones count
        from the end; the outputs come in layer order); None gives all nine. Layers after the last one
        asked for are not run.
        """
        wanted = self._out_indices(out_indices)
        feats = []
        y = self.stem(x)
        if 0 in wanted:
            feats.append(y)
        stage_of = {end: i + 1 for i, end in enumerate(self.stage_ends)}
        for i, block in enumerate(self.blocks):
            if len(feats) == len(wanted):
                return tuple(feats)
            y = block(y)
            if stage_of.get(i) in wanted:
                feats.append(y)
        if len(feats) < len(wanted):
            feats.append(self.head(y))
        return tuple(feats)

    def _out_indices(self, out_indices: Sequence[int] | None) -> set[int]:
        count = len(self.stage_ends) + 2
        if out_indices is None:
            return set(range(count))
        if isinstance(out_indices, int):
            out_indices = [out_indices]
        wanted = set()
        for index in out_indices:
            if not -count <= index < count:
                raise UsageError(f"out_indices: {index} is not a layer of {self.arch} (0..{count - 1}, or negative)")
            wanted.add(index % count)
        if not wanted:
            raise UsageError("out_indices is empty: name at least one layer")
        return wanted

    def forward_stages(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """`extract_feat` as a dict: `stem`, `stage1`..`stage7`, `head`."""
        return dict(zip(self.stage_names(), self.extract_feat(x), strict=True))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The final feature map (after the head conv, before pooling), as timm's `forward_features`."""
        y = self.stem(x)
        for block in self.blocks:
            y = block(y)
        return self.head(y)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pooling and classifier on `forward_features`' output; `pre_logits` stops after the pooling."""
        pooled = features.mean((2, 3))
        if pre_logits or not self.num_classes:
            return pooled
        return self.classifier(self.dropout(pooled))

    def reset_classifier(self, num_classes: int) -> EfficientNet:
        """A new, randomly initialised classifier of `num_classes` outputs (0: none), as timm's; returns self.

        It takes the device and dtype of the head conv's weights; the rest of the model is unchanged.
        """
        if num_classes < 0:
            raise UsageError(f"num_classes must be 0 or more, not {num_classes}")
        if hasattr(self, "classifier"):
            del self.classifier
        self.num_classes = num_classes
        if num_classes:
            like = self.head.conv.weight
            width = spec.head_channels(self.arch)
            self.classifier = nn.Linear(width, num_classes, device=like.device, dtype=like.dtype)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def same_convs(self) -> list[PaddedConv]:
        """Every convolution padded by the padding rule, in the order the input flows through them."""
        convs = [self.stem.conv]
        for block in self.blocks:
            convs += block.padded_convs()
        return [*convs, self.head.conv]

    def set_input_size(self, size: int | tuple[int, int] | None) -> EfficientNet:
        """Work the TF 'SAME' padding out once for inputs of `size` (side, or (height, width)).

        Exact like the dynamic path (which inputs of any other size still take);
        it saves the per-call arithmetic and gives tracers and ONNX export
        constant padding. None returns to fully dynamic padding. Returns self.
        """
        hw = None if size is None else ((size, size) if isinstance(size, int) else (int(size[0]), int(size[1])))
        self.input_size = hw
        for conv in self.same_convs():
            conv.set_input_size(hw)
            if hw is not None:
                hw = conv.output_size(*hw)
        return self


def create_model(
    arch: str,
    num_classes: int = 1000,
    input_size: int | tuple[int, int] | None = None,
    channels_last: bool = True,
) -> EfficientNet:
    """A randomly initialised EfficientNet of `arch` (any name of `spec.ARCH_NAMES`), in eval mode.

    `input_size` fixes the padding for that input size (`EfficientNet.set_input_size`); any size still works.
    `channels_last` (default) stores the convolution weights channels-last, so that every
    convolution runs channels-last whatever the input's layout (NCHW input is fine): 1.2-1.7x
    faster on CPU (scripts/bench_inference.py), logits equal to the NCHW model's to float32 rounding
    (summation order; ~1e-6 relative).
    Outputs and features have the usual NCHW shapes; their strides are channels-last.
    """
    model = EfficientNet(arch, num_classes).set_input_size(input_size).eval()
    return model.to(memory_format=torch.channels_last) if channels_last else model


def model_tensor_shapes(arch: str, num_classes: int) -> tuple[dict[str, tuple[int, ...]], int]:
    """Shapes of the native model's state dict and its parameter count, without allocating it."""
    shapes, params = _tensor_shapes(arch, num_classes)
    return dict(shapes), params


@functools.lru_cache(maxsize=16)
def _tensor_shapes(arch: str, num_classes: int) -> tuple[tuple[tuple[str, tuple[int, ...]], ...], int]:
    with torch.device("meta"):  # building b7's modules takes ~0.1 s: done once per arch
        model = EfficientNet(arch, num_classes)
    shapes = tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())
    return shapes, sum(p.numel() for p in model.parameters())
