"""The one architecture table, asked by everything: the sizes of every registered family and their blocks.

Everything that needs to know a shape (the PyTorch model, the TF reference model, the name mappings,
the parameter counts, the synthetic checkpoints, the catalogue) asks this module. The families
themselves are data (`effconv.models.families`); this module resolves arch names and expands a
size into its blocks (`effconv.models.family.expand_blocks`).

Arch names are the sizes' short names (`b5`), unique across families; the official name with the
family's prefix (`efficientnet-b5`) is accepted wherever an arch is named.
"""

from __future__ import annotations

from dataclasses import replace
from functools import cache

from effconv.models import family as _family
from effconv.models.families import FAMILIES
from effconv.models.family import ArchSpec, BlockSpec, Family, StageSpec

__all__ = ["ARCHS", "ARCH_NAMES", "FAMILIES", "ArchSpec", "BlockSpec", "Family", "StageSpec"]

ARCHS: dict[str, ArchSpec] = {s.name: replace(s, family=f.name) for f in FAMILIES.values() for s in f.sizes}
ARCH_NAMES: tuple[str, ...] = tuple(ARCHS)
# The official name of every arch ("efficientnet-b5"), which users may type too.
# Spelled as the official scope is ("efficientnet-edgetpu-S"); looked up regardless of case.
OFFICIAL_NAMES: dict[str, str] = {
    f"{FAMILIES[a.family].official_prefix}{a.official or a.name}": a.name for a in ARCHS.values()
}


# For messages: what effconv knows, family by family.
KNOWN_MODELS = "; ".join(f"{f.name} {'/'.join(s.name for s in f.sizes)}" for f in FAMILIES.values())


def get_arch(name: str) -> ArchSpec:
    from effconv.errors import UsageError

    key = name.lower().replace("_", "-")
    key = next((short for official, short in OFFICIAL_NAMES.items() if official.lower() == key), key)
    if key not in ARCHS:
        raise UsageError(f"unknown architecture {name!r}; choose one of {', '.join(ARCH_NAMES)}")
    return ARCHS[key]


def family_of(arch: str) -> Family:
    return FAMILIES[get_arch(arch).family]


def official_name(arch: str) -> str:
    """The arch's official name, which is also the scope of its variables: `efficientnet-b5`."""
    size = get_arch(arch)
    return f"{family_of(arch).official_prefix}{size.official or size.name}"


def preprocessing_of(arch: str) -> _family.Preprocessing:
    """The official evaluation preprocessing of `arch`: its size's own, or its family's."""
    return _family.preprocessing(family_of(arch), get_arch(arch))


def stem_channels(arch: str) -> int:
    return _family.stem_channels(family_of(arch), get_arch(arch))


def head_channels(arch: str) -> int:
    return _family.head_channels(family_of(arch), get_arch(arch))


@cache
def blocks(arch: str) -> tuple[BlockSpec, ...]:
    """Every block of `arch` in official (flat) order."""
    return _family.expand_blocks(family_of(arch), get_arch(arch))


def stage_ends(arch: str) -> tuple[int, ...]:
    """Index of the last block of each stage."""
    bl = blocks(arch)
    return tuple(b.index for b, nxt in zip(bl, bl[1:] + (None,), strict=True) if nxt is None or nxt.stage != b.stage)


def archs_of_shape(num_blocks: int, stem: int, head: int) -> list[str]:
    """The archs whose blocks number `num_blocks` and whose stem and head have these widths."""
    return [a for a in ARCH_NAMES if (len(blocks(a)), stem_channels(a), head_channels(a)) == (num_blocks, stem, head)]
