"""What a checkpoint holds: architecture, name prefix, batch-norm scope, classes."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from effconv.errors import CheckpointError, UsageError
from effconv.mappings import official
from effconv.models import spec

_STEM_KERNEL = "stem/conv2d/kernel"
_PREFIX_ARCH = re.compile(r"efficientnet-(b[0-8]|l2)$")
_BLOCK = re.compile(r"/blocks_(\d+)/")


@dataclass(frozen=True)
class CheckpointLayout:
    arch: str
    prefix: str
    bn: str
    num_classes: int
    num_blocks: int
    stem_channels: int
    head_channels: int


def base_name(name: str) -> str:
    return name.removesuffix(official.EMA_SUFFIX)


def _find_prefix(shapes: Mapping[str, tuple[int, ...]]) -> str:
    prefixes = sorted(
        {base_name(n)[: -len(_STEM_KERNEL)].rstrip("/") for n in shapes if base_name(n).endswith(_STEM_KERNEL)}
    )
    if not prefixes:
        raise CheckpointError(
            "not an EfficientNet checkpoint: no '<prefix>/stem/conv2d/kernel' variable "
            f"among its {len(shapes)} variables"
        )
    if len(prefixes) > 1:
        raise CheckpointError(f"checkpoint holds several networks ({', '.join(prefixes)}); effconv takes one")
    return prefixes[0]


def _shape(shapes: Mapping[str, tuple[int, ...]], name: str) -> tuple[int, ...] | None:
    if name in shapes:
        return tuple(shapes[name])
    return tuple(shapes[name + official.EMA_SUFFIX]) if name + official.EMA_SUFFIX in shapes else None


def detect_layout(shapes: Mapping[str, tuple[int, ...]], arch: str | None = None) -> CheckpointLayout:
    """Infer the layout from names and shapes; `arch` (if given) must agree with it."""
    prefix = _find_prefix(shapes)
    root = f"{prefix}/" if prefix else ""
    bn = next((b for b in official.BN_SCOPES if _shape(shapes, f"{root}stem/{b}/gamma")), None)
    if bn is None:
        raise CheckpointError(f"no batch-norm variables under '{root}stem/' (expected {official.BN_SCOPES})")
    stem = _shape(shapes, root + _STEM_KERNEL)
    head = _shape(shapes, f"{root}head/conv2d/kernel")
    if stem is None or len(stem) != 4 or head is None or len(head) != 4:
        raise CheckpointError(f"'{root}stem/conv2d/kernel' or '{root}head/conv2d/kernel' missing or not 4-D")
    indices = {int(m.group(1)) for n in shapes if (m := _BLOCK.search("/" + n))}
    num_blocks = max(indices) + 1 if indices else 0
    found = (num_blocks, stem[3], head[3])
    fitting = [
        a for a in spec.ARCH_NAMES if (len(spec.blocks(a)), spec.stem_channels(a), spec.head_channels(a)) == found
    ]
    described = f"{num_blocks} blocks, stem {stem[3]} and head {head[3]} channels"
    named = m.group(1) if (m := _PREFIX_ARCH.search(prefix)) else None
    if not fitting:
        raise CheckpointError(f"checkpoint '{prefix}' has {described}, which fits no EfficientNet b0-b8/l2")
    detected = named if named in fitting else fitting[0]
    if named and named not in fitting:
        raise CheckpointError(f"checkpoint prefix says '{prefix}' but its shapes ({described}) are not {named}")
    if arch is not None:
        wanted = spec.get_arch(arch).name
        if wanted != detected:
            raise UsageError(f"--arch {wanted} given, but the checkpoint holds {detected} ('{prefix}', {described})")
    dense = _shape(shapes, f"{root}head/dense/kernel")
    return CheckpointLayout(
        arch=detected,
        prefix=prefix,
        bn=bn,
        num_classes=dense[1] if dense and len(dense) == 2 else 0,
        num_blocks=num_blocks,
        stem_channels=stem[3],
        head_channels=head[3],
    )
