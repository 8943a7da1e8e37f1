"""The output layouts `effconv convert --layout` writes, by name."""

from __future__ import annotations

from collections.abc import Callable

from effconv.errors import UsageError
from effconv.mappings import hf, mmpretrain, native, timm
from effconv.mappings.tables import LayoutTable

LAYOUTS: dict[str, LayoutTable] = {t.name: t for t in (native.TABLE, timm.TABLE, mmpretrain.TABLE, hf.TABLE)}
LAYOUT_NAMES: tuple[str, ...] = tuple(LAYOUTS)

# Layout -> the extra model-card section it needs (the name under which it sits is the layout's).
CARD_SECTIONS: dict[str, Callable[[dict], dict]] = {
    "timm": timm.card_section,
    "mmpretrain": mmpretrain.card_section,
    "hf": hf.card_section,
}

# Layout -> its check of (arch, input size), run before any tensor is read: a layout whose library
# cannot build that model exactly (a family it lacks, a size it builds otherwise) refuses it with a
# UsageError naming the model and why.
LAYOUT_CHECKS: dict[str, Callable[[str, int], None]] = {
    "timm": timm.check_expressible,
    "mmpretrain": mmpretrain.check_expressible,
    "hf": hf.check_expressible,
}


def get_layout(name: str) -> LayoutTable:
    if name not in LAYOUTS:
        raise UsageError(f"unknown layout {name!r}; choose one of {', '.join(LAYOUT_NAMES)}")
    return LAYOUTS[name]
