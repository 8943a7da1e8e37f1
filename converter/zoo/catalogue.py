"""The official checkpoints effconv knows by name: `catalogue.json`, read once, looked up by name or alias."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

from effconv.errors import UsageError

CATALOGUE_PATH = Path(__file__).with_name("catalogue.json")
# Why a row's sha256 is null: the catalogue was written where the bucket could not be reached, and a digest
# is only worth pinning once computed from the real file.
UNPINNED_NOTE = (
    "not pinned: the official tarball's sha256 could not be established when the catalogue was written (no "
    "network); `effconv download` records the sha256 of the tarball it fetches and checks it on every later use"
)
BASE_URL_ENV = "EFFCONV_BASE_URL"  # where the tarballs are fetched from: a mirror, or a test server


@dataclass(frozen=True)
class CatalogueEntry:
    """One released checkpoint, with its evaluation settings and published figures."""

    name: str
    aliases: tuple[str, ...]
    file: str  # path under the base URL, e.g. "advprop/efficientnet-b0.tar.gz"
    variant: str
    arch: str
    image_size: int
    crop_padding: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    parameters: int
    flops: int | None  # None: no published count
    top1: float | None
    top5: float | None
    official_top1: float | None
    sha256: str | None
    num_classes: int = 1000  # the released head's outputs (EdgeTPU: 1001, EfficientNetV2 -21k: 21843)

    def url(self, base_url: str | None = None) -> str:
        """Download address: `base_url`, else $EFFCONV_BASE_URL, else the official bucket."""
        base = base_url or os.environ.get(BASE_URL_ENV) or official_base_url()
        return base.rstrip("/") + "/" + self.file

    @property
    def stem(self) -> str:
        """The file path without `.tar.gz`: where `effconv download` extracts the checkpoint."""
        return self.file.removesuffix(".tar.gz").removesuffix(".tgz").removesuffix(".tar")

    def to_dict(self, base_url: str | None = None) -> dict:
        out = {**asdict(self), "url": self.url(base_url)}
        if self.sha256 is None:
            out["sha256_note"] = UNPINNED_NOTE
        return out


@cache
def _document() -> dict:
    return json.loads(CATALOGUE_PATH.read_text())


def official_base_url() -> str:
    return _document()["base_url"]


@cache
def entries() -> tuple[CatalogueEntry, ...]:
    """Every catalogue row, in catalogue order."""
    rows = []
    for row in _document()["models"]:
        fields = dict(row)
        for key in ("aliases", "mean", "std"):
            fields[key] = tuple(fields[key])
        rows.append(CatalogueEntry(**fields))
    return tuple(rows)


@cache
def _by_key() -> dict[str, CatalogueEntry]:
    table: dict[str, CatalogueEntry] = {}
    for entry in entries():
        for key in (entry.name, *entry.aliases):
            table[key.lower()] = entry
    return table


def lookup(name: str) -> CatalogueEntry | None:
    """The entry called `name` (its name or an alias, any case), else None."""
    return _by_key().get(name.strip().lower())


def get_entry(name: str) -> CatalogueEntry:
    entry = lookup(name)
    if entry is None:
        close = sorted(k for k in _by_key() if name.lower().strip() in k)[:5]
        hint = f"; did you mean {', '.join(close)}?" if close else "; `effconv list` shows the names"
        raise UsageError(f"{name!r} is not in the catalogue{hint}")
    return entry


def select(arch: str | None = None, variant: str | None = None) -> list[CatalogueEntry]:
    """Entries of one arch and/or variant."""
    return [e for e in entries() if (arch is None or e.arch == arch) and (variant is None or e.variant == variant)]


def checksum_note(rows: list[CatalogueEntry]) -> str | None:
    """A line under the table saying which rows have no pinned sha256, or None when every row has one."""
    unpinned = sum(e.sha256 is None for e in rows)
    if not unpinned:
        return None
    which = "any of these checkpoints" if unpinned == len(rows) else f"{unpinned} of these {len(rows)} checkpoints"
    return f"sha256: {UNPINNED_NOTE.replace('not pinned', f'not pinned for {which}', 1)}"


def explain_no_match(arch: str | None, variant: str | None) -> str:
    """Why `select(arch, variant)` is empty, and what the catalogue has instead."""
    asked = " ".join(f"--{k} {v}" for k, v in (("arch", arch), ("variant", variant)) if v is not None)
    if arch is not None and select(arch):
        there = sorted({e.variant for e in select(arch)})
        return f"no catalogue row matches {asked}: {arch} is released as {', '.join(there)} only"
    if arch is not None:
        return f"no catalogue row matches {asked}: no official checkpoint of {arch} is released"
    variants = sorted({e.variant for e in entries()})
    return f"no catalogue row matches {asked}: the catalogue's variants are {', '.join(variants)}"


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_table(rows: list[CatalogueEntry]) -> str:
    """A fixed-width table for the terminal."""
    header = ("name", "alias", "variant", "size", "classes", "params", "GFLOPs", "top-1", "top-5", "TF top-1")
    lines = [
        (
            e.name,
            e.aliases[0],
            e.variant,
            str(e.image_size),
            str(e.num_classes),
            f"{e.parameters / 1e6:.2f}M",
            "-" if e.flops is None else f"{e.flops / 1e9:.2f}",
            _figure(e.top1),
            _figure(e.top5),
            "-" if e.official_top1 is None else f"{e.official_top1:.1f}",
        )
        for e in rows
    ]
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
    text_columns = 3  # left-aligned; the figures are right-aligned

    def fmt(row: tuple[str, ...]) -> str:
        cells = [
            c.ljust(w) if i < text_columns else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    return "\n".join([fmt(header), *(fmt(r) for r in lines)])
