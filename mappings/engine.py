"""Expands mapping tables over the architecture table and matches them to a checkpoint.

The engine, not the rows, guarantees that every target tensor is filled exactly
once and that every source variable is either used exactly once or reported
with a reason.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace

from effconv.errors import MappingError
from effconv.mappings import official, transforms
from effconv.mappings.tables import LayoutTable, Rule, SourceTable
from effconv.models import spec


@dataclass(frozen=True)
class TensorMapping:
    """One target tensor: where it comes from and how its layout changes."""

    source: str  # base (non-EMA) source name
    target: str
    transform: str


def layer_groups(arch: str) -> tuple[int, ...]:
    """For each stage, its layer: every stride-1 stage after the first joins the stage before it.

    Layer 0 is the stem, so the first stage is layer 1 (as mmpretrain numbers them).
    """
    layers: list[int] = []
    for block in spec.blocks(arch):
        if block.stage == len(layers):  # the stage's first block carries the stage's stride
            joins = block.stage > 0 and block.stride == 1
            layers.append(layers[-1] if joins else (layers[-1] + 1 if layers else 1))
    return tuple(layers)


def block_fields(arch: str) -> list[dict[str, int | str]]:
    """The fields a block scope may name, for every block of `arch` in flat order."""
    layers = layer_groups(arch)
    fields: list[dict[str, int | str]] = []
    pos_in_stage: dict[int, int] = {}
    pos_in_layer: dict[int, int] = {}
    for block in spec.blocks(arch):
        pos = pos_in_stage[block.stage] = pos_in_stage.get(block.stage, -1) + 1
        layer = layers[block.stage]
        layer_pos = pos_in_layer[layer] = pos_in_layer.get(layer, -1) + 1
        fields.append(
            {
                "index": block.index,
                "stage": block.stage,
                "stage_number": block.stage + 1,
                "pos": pos,
                "letter": chr(ord("a") + pos),
                "layer": layer,
                "layer_pos": layer_pos,
                "kernel": block.kernel,
                "mid": block.mid_channels,
                "out": block.out_channels,
            }
        )
    return fields


def global_fields(arch: str) -> dict[str, int]:
    """The fields stem and head rows may name."""
    return {"head_layer": max(layer_groups(arch)) + 1}


def _expand_rules(
    table: SourceTable,
    rules: Sequence[Rule],
    scope: str,
    target: str,
    names,
    parts: frozenset[str] = frozenset(),
    root: str = "",
) -> list[TensorMapping]:
    out = []
    for rule in rules:
        if rule.part is not None and rule.part not in parts:
            continue
        source = rule.source.format(**names)
        src = f"{root}{source[2:]}" if source.startswith("~/") else f"{scope}{source}"
        dst = f"{target}{rule.target}"
        if rule.transform == "bn":
            out.extend(
                TensorMapping(f"{src}{table.separator}{field}", f"{dst}.{pt}", "copy") for field, pt in table.bn_fields
            )
        else:
            out.append(TensorMapping(src, dst, rule.transform.format(**names)))
    return out


_NUMBERED = re.compile(r"<([A-Za-z0-9_]+)#(\d+)>")


def _layer_number(name: str) -> int:
    """The model-wide number Keras gave a layer name: `cond_conv2d` 0, `cond_conv2d_7` 7."""
    tail = name.rpartition("_")[2]
    return int(tail) if tail.isdigit() else 0


def _number_layers(
    rows: Sequence[TensorMapping],
    table: SourceTable,
    root: str,
    variables: Collection[str] | None,
    blocks_before: dict[str, int],
) -> list[TensorMapping]:
    """One block's `rows` with every `<layer#j>` token (the block's j-th layer of that name) replaced by a real name.

    Without `variables`, as the official code numbers them model-wide (for checkpoints written here); with
    `variables` (a checkpoint's variable names), the block's layers of that name found there, in number order,
    wherever they sit between the network's scope and the block's. `blocks_before` counts, for each layer
    name, the earlier blocks that have it; this block's layers are added to it.
    """
    found: dict[str, list[str]] = {}  # this block's layers of each name: their full scopes, in number order
    out = []
    for m in rows:
        token = _NUMBERED.search(m.source)
        if token is None:
            out.append(m)
            continue
        layer, j = token.group(1), int(token.group(2))
        before, after = m.source[: token.start()], m.source[token.end() :]
        if layer not in found:
            found[layer] = _layer_scopes(table, layer, before, after, root, variables, blocks_before.get(layer, 0))
        scopes = found[layer]
        if j >= len(scopes):
            raise MappingError(
                f"checkpoint lacks {layer} layers under {before.rstrip('/')}: rows name {j + 1} "
                f"(lowest-numbered first), {len(scopes)} found"
            )
        out.append(replace(m, source=scopes[j] + after))
    for layer in found:
        blocks_before[layer] = blocks_before.get(layer, 0) + 1
    return out


def _layer_scopes(
    table: SourceTable, layer: str, before: str, after: str, root: str, names: Collection[str] | None, earlier: int
) -> list[str]:
    """The full scopes of one block's `layer` layers, lowest number first."""
    if names is None:
        constructed, first = table.numbered_layers[layer]
        numbers = range(earlier * constructed + first, (earlier + 1) * constructed)
        return [f"{before}{layer}_{n}" if n else f"{before}{layer}" for n in numbers]
    block_scope = before.rstrip("/").rpartition("/")[2]  # "blocks_8"
    pattern = re.compile(
        f"^({re.escape(root)}(?:.*/)?{re.escape(block_scope)}/{re.escape(layer)}(?:_\\d+)?){re.escape(after)}$"
    )
    scopes = {match.group(1) for n in names if (match := pattern.match(n))}
    return sorted(scopes, key=_layer_number)


def block_rows(table: SourceTable | LayoutTable, block: spec.BlockSpec) -> tuple:
    """`table`'s rows for `block`, by its variant; a table without them cannot express the model."""
    try:
        return table.blocks[block.variant]
    except KeyError:
        raise MappingError(
            f"the {table.name} table has no rows for {block.variant} blocks (block {block.index})"
        ) from None


def source_plan(
    table: SourceTable,
    arch: str,
    num_classes: int,
    root: str = "",
    *,
    variables: Collection[str] | None = None,
    **names: str,
) -> tuple[TensorMapping, ...]:
    """Every tensor of the native model of `arch`, with its name in `table`'s source format.

    `root` prefixes every source name; `names` fill the rows' own fields (e.g. `bn`). Layers numbered
    model-wide (`<layer#j>` in a block row) are named as found among `variables` (a checkpoint's variable
    names) when given, else as the official code numbers them.
    """
    plan = _expand_rules(table, table.stem, root, "", names)
    blocks_before: dict[str, int] = {}  # numbered layer name -> earlier blocks that have it
    for block, fields in zip(spec.blocks(arch), block_fields(arch), strict=True):
        scope = root + table.block_scope.format(**fields)
        target = official.BLOCK_TARGET.format(index=block.index) + "."
        fields_and_names = {**fields, **names}
        rows = _expand_rules(table, block_rows(table, block), scope, target, fields_and_names, block.parts, root)
        plan += _number_layers(rows, table, root, variables, blocks_before)
    plan += _expand_rules(table, table.head, root, "", names)
    if num_classes:
        plan += _expand_rules(table, table.classifier, root, "", names)
    for what, values in (("target", [m.target for m in plan]), ("source", [m.source for m in plan])):
        if len(set(values)) != len(values):
            raise AssertionError(f"{table.name} mapping table uses a {what} twice")
    if any(_NUMBERED.search(m.source) for m in plan):  # layers are numbered within blocks only
        raise AssertionError(f"{table.name} mapping table numbers a layer (<name#j>) outside the blocks")
    return tuple(plan)


def official_plan(
    arch: str,
    num_classes: int,
    prefix: str,
    bn: str = "tpu_batch_normalization",
    names: Collection[str] | None = None,
) -> tuple[TensorMapping, ...]:
    """Every tensor of the native model of `arch`, with its official source name.

    Layers the official code numbers model-wide (CondConv's) are named as found among `names` (a
    checkpoint's base variable names) when given, else as the official code names them.
    """
    root = f"{prefix}/" if prefix else ""
    plan = source_plan(official.TABLE, arch, num_classes, root, variables=names, bn=bn)
    return plan if names is None else take_aliases(plan, official.TABLE, root, names)


def take_aliases(
    plan: Sequence[TensorMapping], table: SourceTable, root: str, names: Collection[str]
) -> tuple[TensorMapping, ...]:
    """`plan` with each source missing from `names` renamed by the table's scope aliases where that name is there."""
    out = []
    for m in plan:
        if m.source not in names:
            for scope, alias in table.aliases:
                other = m.source.replace(root + scope, root + alias, 1)
                if other != m.source and other in names:
                    m = replace(m, source=other)
                    break
        out.append(m)
    return tuple(out)


def layout_names(table: LayoutTable, arch: str, num_classes: int) -> dict[str, str]:
    """Canonical tensor name -> `table`'s name, for every tensor of the native model (in its order).

    Fails unless every canonical tensor is renamed exactly once and no two land on one name.
    """
    from effconv.models.efficientnet import model_tensor_shapes

    modules: dict[str, str] = {}
    tops, scopes = global_fields(arch), block_fields(arch)
    if spec.family_of(arch).name in table.layers_by_stage:
        scopes = [{**f, "layer": f["stage_number"], "layer_pos": f["pos"]} for f in scopes]
        tops = {**tops, "head_layer": scopes[-1]["stage_number"] + 1}
    for canonical, renamed in (*table.stem, *table.head, *table.classifier):
        modules[canonical] = renamed.format(**tops)
    for block, fields in zip(spec.blocks(arch), scopes, strict=True):
        rows = block_rows(table, block)
        source_scope = official.BLOCK_TARGET.format(index=block.index) + "."
        target_scope = table.block_scope.format(**fields)
        for canonical, renamed in rows:
            modules[source_scope + canonical] = target_scope + renamed
    names: dict[str, str] = {}
    for tensor in model_tensor_shapes(arch, num_classes)[0]:
        module, _, leaf = tensor.rpartition(".")
        if module not in modules:
            raise MappingError(f"the {table.name} layout table has no row for {module!r} ({tensor})")
        names[tensor] = f"{modules[module]}.{leaf}"
    if len(set(names.values())) != len(names):
        raise MappingError(f"the {table.name} layout table gives two tensors one name")
    return names


def rename(state: Mapping[str, object], names: Mapping[str, str]) -> dict:
    """`state` under the names of a layout (see `layout_names`), in the same order."""
    return {names[k]: v for k, v in state.items()}


def check_plan(
    plan: Sequence[TensorMapping],
    source_shapes: Mapping[str, tuple[int, ...]],
    target_shapes: Mapping[str, tuple[int, ...]],
) -> None:
    """Fail with one clear message when a target is unfilled or a shape does not fit.

    `source_shapes` maps each plan entry's source to the shape of the tensor that
    will actually be read (EMA or raw copy).
    """
    planned = {m.target for m in plan}
    unfilled = sorted(set(target_shapes) - planned)
    if unfilled:
        raise MappingError(f"no mapping rule fills {len(unfilled)} model tensors, e.g. {unfilled[:3]}")
    extra = sorted(planned - set(target_shapes))
    if extra:
        raise MappingError(f"mapping rules name tensors the model lacks, e.g. {extra[:3]}")
    missing = [m.source for m in plan if m.source not in source_shapes]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise MappingError(f"checkpoint lacks {len(missing)} variables the model needs: {missing[:3]}{more}")
    for m in plan:
        got = transforms.target_shape(m.transform, source_shapes[m.source])
        want = tuple(target_shapes[m.target])
        if got != want:
            raise MappingError(
                f"variable {m.source} has shape {list(source_shapes[m.source])}, "
                f"which does not fit {m.target} {list(want)}"
            )


def classify_unused(names: Sequence[str], table: SourceTable = official.TABLE) -> dict[str, str]:
    """A reason for each source variable no mapping used."""
    exact = dict(table.known_names)
    reasons = {}
    for name in names:
        if name in exact:
            reasons[name] = exact[name]
        else:
            reasons[name] = next((r for s, r in table.known_suffixes if name.endswith(s)), "unknown variable")
    return reasons


def source_shapes(plan: Sequence[TensorMapping], arch: str, num_classes: int) -> dict[str, tuple[int, ...]]:
    """Source name -> source shape of every tensor in `plan`, in the plan's order, derived from the native model."""
    from effconv.models.efficientnet import model_tensor_shapes

    targets, _ = model_tensor_shapes(arch, num_classes)
    return {m.source: transforms.source_shape(m.transform, targets[m.target]) for m in plan}
