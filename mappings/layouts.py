"""The output layouts `effconv convert --layout` writes, by name."""

from __future__ import annotations

from collections.abc import Callable

from effconv.errors import UsageError
from effconv.mappings import mmpretrain, native, timm
from effconv.mappings.tables import LayoutTable

LAYOUTS: dict[str, LayoutTable] = {t.name: t for t in (native.TABLE, timm.TABLE, mmpretrain.TABLE)}
LAYOUT_NAMES: tuple[str, ...] = tuple(LAYOUTS)

# Layout -> the extra model-card section it needs (the name under which it sits is the layout's).
CARD_SECTIONS: dict[str, Callable[[dict], dict]] = {
    "timm": timm.card_section,
    "mmpretrain": mmpretrain.card_section,
}


def get_layout(name: str) -> LayoutTable:
    if name not in LAYOUTS:
        raise UsageError(f"unknown layout {name!r}; choose one of {', '.join(LAYOUT_NAMES)}")
    return LAYOUTS[name]
