"""The records an architecture table is made of: a family's base stages, its sizes, and the blocks they give.

Pure data. A `Family` says everything that varies between EfficientNet families: the base stage
table (each stage naming the `kind` of its blocks), the scaling table of its sizes, the rounding
rules, activation, squeeze-excite, batch-norm settings, padding, stem and head, and the default
preprocessing of its checkpoints. `expand_blocks` turns one size of a family into `BlockSpec`s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class StageSpec:
    """One stage of a family's base network, before scaling."""

    kind: str  # the block kind of every block in the stage (a key of the block tables)
    repeats: int
    kernel: int
    stride: int
    expand: int
    in_channels: int
    out_channels: int
    se_ratio: float | None = 0.25  # None: no squeeze-excite
    residual: bool = True  # False: never an identity shortcut (the official "noskip")


@dataclass(frozen=True)
class Preprocessing:
    """A family's default evaluation preprocessing (a variant may change mean/std)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    crop_padding: int
    crop_below: int | None = None  # crop only for sizes below this (None: always); EfficientNetV2's 320
    crop_offset: str = "ceil"  # the odd pixel of the margin: top/left ("ceil", TPU repo) or bottom/right ("floor")
    # where the official trainer's evaluation resized otherwise than the single-image evaluator (docs/families.md)
    trainer_interpolation: str | None = None


@dataclass(frozen=True)
class ArchSpec:
    """One size of a family: its scaling coefficients and native input size."""

    name: str  # the short arch name users type ("b5"); unique across families
    width: float
    depth: float
    resolution: int
    dropout: float
    family: str = ""  # filled in by the registry
    official: str = ""  # the size in the official name where it is not `name` ("edgetpu-S" for "edgetpu-s")
    experts: int = 0  # CondConv experts per conditional convolution (0: the family has none)
    stages: tuple[StageSpec, ...] | None = None  # a stage table of its own (EfficientNetV2 S/M/L/XL)
    preprocessing: Preprocessing | None = None  # an evaluation pipeline of its own (EfficientNetV2 S/M/L/XL)


@dataclass(frozen=True)
class Family:
    """Everything that varies between model families, as data."""

    name: str
    official_prefix: str  # official scope of a size: official_prefix + size name ("efficientnet-b5")
    stages: tuple[StageSpec, ...]
    sizes: tuple[ArchSpec, ...]
    preprocessing: Preprocessing
    stem_channels: int | None = 32  # None: the first stage's input width (EfficientNetV2)
    head_channels: int = 1280
    fix_stem_head: bool = False  # stem and head keep their base width, first and last stage their repeats
    activation: str = "swish"  # "swish", "relu6" or "relu": stem, blocks and head
    se_base: str = "block_in"  # squeeze-excite width from the block's input ("block_in") or expanded ("mid") width
    channel_divisor: int = 8
    round_up_below: float | None = 0.9  # add a divisor when rounding kept less than this fraction (None: never)
    bn_eps: float = 1e-3
    bn_momentum: float = 0.01  # PyTorch's convention (TF's 0.99)
    padding: str = "tf-same"  # "tf-same" or "symmetric"

    def round_channels(self, channels: int, width: float) -> int:
        """Channel scaling: nearest multiple of the divisor (at least one), optionally never losing > 10 %."""
        d = self.channel_divisor
        scaled = channels * width
        rounded = max(d, int(scaled + d / 2) // d * d)
        if self.round_up_below is not None and rounded < self.round_up_below * scaled:
            rounded += d
        return int(rounded)

    @staticmethod
    def round_repeats(repeats: int, depth: float) -> int:
        """Depth scaling."""
        return int(math.ceil(depth * repeats))


@dataclass(frozen=True)
class BlockSpec:
    """One block after scaling; `index` is its official flat number, `kind` what it is made of."""

    index: int
    stage: int
    kind: str
    in_channels: int  # what the layer before gives
    out_channels: int
    expand: int
    kernel: int
    stride: int
    se_channels: int  # 0: no squeeze-excite
    mid_channels: int  # the expanded width: nominal input x expand ratio, or the input itself without expand
    experts: int = 0  # CondConv experts (condconv kinds only)
    activation: str = "swish"
    bn_eps: float = 1e-3
    bn_momentum: float = 0.01
    padding: str = "tf-same"
    residual: bool = True  # False: no identity shortcut even where the shapes allow one

    @property
    def has_expand(self) -> bool:
        return self.expand != 1

    @property
    def has_se(self) -> bool:
        return self.se_channels > 0

    @property
    def has_residual(self) -> bool:
        return self.residual and self.stride == 1 and self.in_channels == self.out_channels

    @property
    def variant(self) -> str:
        """The key of this block's rows in the mapping tables: its kind, marked when it has no expand step.

        Without the expand step a block's layers are numbered differently in every format
        (official `_1`/`_2` suffixes, timm's bn1/bn2), so its rows are a table of their own.
        """
        return self.kind if self.has_expand else f"{self.kind}:no_expand"

    @property
    def parts(self) -> frozenset[str]:
        """The optional parts this block has; mapping rows that need a part apply only where it is."""
        return frozenset(p for p, present in (("expand", self.has_expand), ("se", self.has_se)) if present)


# Block kinds whose convolutions are conditionally parameterised: they take the size's expert count.
EXPERT_KINDS = frozenset({"condconv_mbconv"})


def stages(family: Family, size: ArchSpec) -> tuple[StageSpec, ...]:
    """The stage table of `size`: its own, or its family's."""
    return size.stages or family.stages


def preprocessing(family: Family, size: ArchSpec) -> Preprocessing:
    """The evaluation preprocessing of `size`: its own, or its family's."""
    return size.preprocessing or family.preprocessing


def stem_channels(family: Family, size: ArchSpec) -> int:
    base = stages(family, size)[0].in_channels if family.stem_channels is None else family.stem_channels
    if family.fix_stem_head:
        return base
    return family.round_channels(base, size.width)


def head_channels(family: Family, size: ArchSpec) -> int:
    if family.fix_stem_head:
        return family.head_channels
    return family.round_channels(family.head_channels, size.width)


def expand_blocks(family: Family, size: ArchSpec) -> tuple[BlockSpec, ...]:
    """Every block of `size` in official (flat) order: the first of a stage takes its stride and in -> out.

    The official builders size a block from its nominal input width (the stage's scaled input, then
    its output): the expanded width and the squeeze-excite width. The block really reads what the
    layer before gives, which differs only where the stem keeps its base width (`fix_stem_head`).
    """
    out: list[BlockSpec] = []
    block_in = stem_channels(family, size)
    table = stages(family, size)
    last = len(table) - 1
    for stage_index, stage in enumerate(table):
        cin = family.round_channels(stage.in_channels, size.width)
        cout = family.round_channels(stage.out_channels, size.width)
        fixed = family.fix_stem_head and stage_index in (0, last)
        repeats = stage.repeats if fixed else family.round_repeats(stage.repeats, size.depth)
        for i in range(repeats):
            nominal = cin if i == 0 else cout
            se_base = nominal if family.se_base == "block_in" else nominal * stage.expand
            out.append(
                BlockSpec(
                    index=len(out),
                    stage=stage_index,
                    kind=stage.kind,
                    in_channels=block_in,
                    out_channels=cout,
                    expand=stage.expand,
                    kernel=stage.kernel,
                    stride=stage.stride if i == 0 else 1,
                    se_channels=0 if stage.se_ratio is None else max(1, int(se_base * stage.se_ratio)),
                    mid_channels=nominal * stage.expand if stage.expand != 1 else block_in,
                    activation=family.activation,
                    bn_eps=family.bn_eps,
                    bn_momentum=family.bn_momentum,
                    padding=family.padding,
                    residual=stage.residual,
                    experts=size.experts if stage.kind in EXPERT_KINDS else 0,
                )
            )
            block_in = cout
    return tuple(out)
