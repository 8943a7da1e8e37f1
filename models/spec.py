"""The one architecture table for EfficientNet b0..b8 and l2.

Everything that needs to know a shape (the PyTorch model, the TF reference
model, the name mappings, the parameter counts, the synthetic checkpoints)
asks this module. Pure data plus the two official rounding rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache


@dataclass(frozen=True)
class StageSpec:
    """One stage of the base (b0) network, before scaling."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    in_channels: int
    out_channels: int
    se_ratio: float = 0.25


@dataclass(frozen=True)
class ArchSpec:
    """Scaling coefficients and native input size of one architecture."""

    name: str
    width: float
    depth: float
    resolution: int
    dropout: float


@dataclass(frozen=True)
class BlockSpec:
    """One MBConv block after scaling; `index` is the official flat number."""

    index: int
    stage: int
    in_channels: int
    out_channels: int
    expand: int
    kernel: int
    stride: int
    se_channels: int

    @property
    def mid_channels(self) -> int:
        return self.in_channels * self.expand

    @property
    def has_expand(self) -> bool:
        return self.expand != 1

    @property
    def has_residual(self) -> bool:
        return self.stride == 1 and self.in_channels == self.out_channels


BASE_STAGES: tuple[StageSpec, ...] = (
    StageSpec(1, 3, 1, 1, 32, 16),
    StageSpec(2, 3, 2, 6, 16, 24),
    StageSpec(2, 5, 2, 6, 24, 40),
    StageSpec(3, 3, 2, 6, 40, 80),
    StageSpec(3, 5, 1, 6, 80, 112),
    StageSpec(4, 5, 2, 6, 112, 192),
    StageSpec(1, 3, 1, 6, 192, 320),
)

STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPS = 1e-3
BN_MOMENTUM_TORCH = 0.01  # TF's 0.99
CHANNEL_DIVISOR = 8

ARCHS: dict[str, ArchSpec] = {
    a.name: a
    for a in (
        ArchSpec("b0", 1.0, 1.0, 224, 0.2),
        ArchSpec("b1", 1.0, 1.1, 240, 0.2),
        ArchSpec("b2", 1.1, 1.2, 260, 0.3),
        ArchSpec("b3", 1.2, 1.4, 300, 0.3),
        ArchSpec("b4", 1.4, 1.8, 380, 0.4),
        ArchSpec("b5", 1.6, 2.2, 456, 0.4),
        ArchSpec("b6", 1.8, 2.6, 528, 0.5),
        ArchSpec("b7", 2.0, 3.1, 600, 0.5),
        ArchSpec("b8", 2.2, 3.6, 672, 0.5),
        ArchSpec("l2", 4.3, 5.3, 800, 0.5),
    )
}

ARCH_NAMES: tuple[str, ...] = tuple(ARCHS)


def round_channels(channels: int, width: float) -> int:
    """Official channel scaling: nearest multiple of 8, never losing > 10 %."""
    scaled = channels * width
    rounded = max(CHANNEL_DIVISOR, int(scaled + CHANNEL_DIVISOR / 2) // CHANNEL_DIVISOR * CHANNEL_DIVISOR)
    if rounded < 0.9 * scaled:
        rounded += CHANNEL_DIVISOR
    return int(rounded)


def round_repeats(repeats: int, depth: float) -> int:
    """Official depth scaling."""
    return int(math.ceil(depth * repeats))


def get_arch(name: str) -> ArchSpec:
    from effconv.errors import UsageError

    key = name.lower().removeprefix("efficientnet-").removeprefix("efficientnet_")
    if key not in ARCHS:
        raise UsageError(f"unknown architecture {name!r}; choose one of {', '.join(ARCH_NAMES)}")
    return ARCHS[key]


def stem_channels(arch: str) -> int:
    return round_channels(STEM_CHANNELS, get_arch(arch).width)


def head_channels(arch: str) -> int:
    return round_channels(HEAD_CHANNELS, get_arch(arch).width)


@cache
def blocks(arch: str) -> tuple[BlockSpec, ...]:
    """Every block of `arch` in official (flat) order."""
    spec = get_arch(arch)
    out: list[BlockSpec] = []
    for stage_index, stage in enumerate(BASE_STAGES):
        cin = round_channels(stage.in_channels, spec.width)
        cout = round_channels(stage.out_channels, spec.width)
        for i in range(round_repeats(stage.repeats, spec.depth)):
            block_in = cin if i == 0 else cout
            out.append(
                BlockSpec(
                    index=len(out),
                    stage=stage_index,
                    in_channels=block_in,
                    out_channels=cout,
                    expand=stage.expand,
                    kernel=stage.kernel,
                    stride=stage.stride if i == 0 else 1,
                    se_channels=max(1, int(block_in * stage.se_ratio)),
                )
            )
    return tuple(out)


def stage_ends(arch: str) -> tuple[int, ...]:
    """Index of the last block of each stage."""
    bl = blocks(arch)
    return tuple(b.index for b, nxt in zip(bl, bl[1:] + (None,), strict=True) if nxt is None or nxt.stage != b.stage)
