"""The two shapes a mapping table takes; `effconv.mappings.engine` expands both.

A `SourceTable` maps one source format's variable names (official TF
checkpoint, Keras .h5) to effconv's canonical names (the native model's state
dict) with a layout transform. A `LayoutTable` renames canonical modules to one
output layout's modules (native, timm, mmpretrain); the tensors themselves do
not change. Neither knows how many blocks an arch has, nor any block kind: block
rows are keyed by `BlockSpec.variant` (the block's kind, marked when it has no
expand step), and the engine expands them over `spec.blocks(arch)`. A row that
names an optional part (`"se"`, `"expand"`) applies only to blocks that have it.

Block scopes are format strings over these fields of each block:
`index` (flat, 0-based), `stage` (0-based) and `stage_number` (1-based),
`pos` (position in its stage), `letter` (`pos` as a, b, c, ...), and `layer` /
`layer_pos`: the block's place when every stride-1 stage after the first joins
the stage before it (layer 0 is the stem, the last block layer is followed by
`head_layer`, which the head rows may use; a layout table's `layers_by_stage` families number
layers by stage instead), and the block's geometry: `kernel`, `mid` (expanded
width) and `out` (output channels), which transforms with arguments may name. A source row starting
with `~/` is rooted at the network's scope instead of the block's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple


class Rule(NamedTuple):
    """One source variable (or, with transform "bn", one batch-norm scope) -> one canonical tensor."""

    source: str
    target: str
    transform: str
    part: str | None = None  # only for blocks with this optional part (`BlockSpec.parts`)


@dataclass(frozen=True)
class SourceTable:
    """Source names -> canonical names, with block rows per block variant.

    Source rows may name `{field}`s that are given when the plan is expanded
    (e.g. `{bn}`, the batch-norm scope of an official checkpoint). A row with
    transform "bn" expands over `bn_fields`, joined with `separator`.
    """

    name: str
    stem: tuple[Rule, ...]
    blocks: Mapping[str, tuple[Rule, ...]]  # BlockSpec.variant -> rows
    head: tuple[Rule, ...]
    classifier: tuple[Rule, ...]
    block_scope: str  # source prefix of a block's rows
    bn_fields: tuple[tuple[str, str], ...]  # (source field, canonical tensor)
    known_names: tuple[tuple[str, str], ...] = ()  # (exact name, reason it is not a model tensor)
    known_suffixes: tuple[tuple[str, str], ...] = ()  # (name suffix, reason)
    separator: str = "/"
    # Rows may name a layer by its order in the block, `<layer#j>`, where the format numbers layers
    # model-wide (Keras): layer -> (layers of that name a block constructs, the first one rows use).
    numbered_layers: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    # (scope, another name the same scope may have): tried where a checkpoint lacks the first
    aliases: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class LayoutTable:
    """Canonical module names -> one output layout's module names, per section.

    Each row is (canonical module, layout module); every tensor of the module
    (weight, bias, BN statistics, `num_batches_tracked`) keeps its own name.
    """

    name: str
    stem: tuple[tuple[str, str], ...]
    blocks: Mapping[str, tuple[tuple[str, str], ...]]  # BlockSpec.variant -> rows
    head: tuple[tuple[str, str], ...]
    classifier: tuple[tuple[str, str], ...]
    block_scope: str  # layout prefix of a block's modules
    library: str  # who loads this layout (named when effconv's own loader refuses it)
    # Families this layout numbers by stage: their `layer` is the stage itself (`stage_number`, no stride-1
    # stage joining the one before), `layer_pos` its `pos`, and `head_layer` follows the last stage.
    layers_by_stage: frozenset[str] = frozenset()
    checkpoint_key: str | None = None  # .pth files wrap the state dict as {checkpoint_key: ..., "meta": card}
    folder: FolderLayout | None = None  # a layout written as a folder (--out DIR), not as one weights file


@dataclass(frozen=True)
class FolderLayout:
    """What a folder layout holds: its weights file and the JSON files its library reads, made from the card."""

    weights: str  # the safetensors file's name in the folder; the model card is its X.json beside it
    files: Mapping[str, Callable[[Any], dict]]  # file name -> its JSON object, from the model card
    metadata: Mapping[str, str]  # the safetensors metadata the library expects (the card is in X.json)
