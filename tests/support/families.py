"""A made-up family registered for one test: it exercises every field of the family seam the B family leaves at
its default (ReLU6, no squeeze-excite, stem and head fixed in size, symmetric padding, no "+8 if it lost 10 %").
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

from effconv.models import spec
from effconv.models.families import FAMILIES
from effconv.models.family import ArchSpec, Family, Preprocessing, StageSpec

TOY = Family(
    name="toynet",
    official_prefix="toynet-",
    stages=(
        StageSpec("mbconv", 1, 3, 1, 1, 32, 16, se_ratio=None),
        StageSpec("mbconv", 2, 3, 2, 6, 16, 24, se_ratio=None),
        StageSpec("mbconv", 2, 5, 2, 4, 24, 40, se_ratio=None),
    ),
    sizes=(ArchSpec("t0", 1.0, 1.0, 64, 0.2), ArchSpec("t1", 1.3, 1.6, 72, 0.2)),
    preprocessing=Preprocessing((127.0,) * 3, (128.0,) * 3, "bilinear", 32),
    stem_channels=24,
    head_channels=96,
    fix_stem_head=True,
    activation="relu6",
    round_up_below=None,
    padding="symmetric",
)


@contextlib.contextmanager
def registered(family: Family = TOY):
    """`family` in the registry for the duration (and the caches that depend on it cleared)."""
    from effconv.models.efficientnet import _tensor_shapes

    saved = (dict(FAMILIES), dict(spec.ARCHS), spec.ARCH_NAMES, dict(spec.OFFICIAL_NAMES))
    FAMILIES[family.name] = family
    for size in family.sizes:
        spec.ARCHS[size.name] = replace(size, family=family.name)
        spec.OFFICIAL_NAMES[f"{family.official_prefix}{size.name}"] = size.name
    spec.ARCH_NAMES = tuple(spec.ARCHS)
    spec.blocks.cache_clear()
    _tensor_shapes.cache_clear()
    try:
        yield family
    finally:
        FAMILIES.clear()
        FAMILIES.update(saved[0])
        spec.ARCHS.clear()
        spec.ARCHS.update(saved[1])
        spec.ARCH_NAMES = saved[2]
        spec.OFFICIAL_NAMES.clear()
        spec.OFFICIAL_NAMES.update(saved[3])
        spec.blocks.cache_clear()
        _tensor_shapes.cache_clear()
