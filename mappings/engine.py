"""Expands mapping tables over the architecture table and matches them to a checkpoint.

The engine, not the rows, guarantees that every target tensor is filled exactly
once and that every source variable is either used exactly once or reported
with a reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from effconv.errors import MappingError
from effconv.mappings import official, transforms
from effconv.models import spec


@dataclass(frozen=True)
class TensorMapping:
    """One target tensor: where it comes from and how its layout changes."""

    source: str  # base (non-EMA) official name
    target: str
    transform: str


def _expand_rules(rules: Sequence[official.Rule], scope: str, target: str, bn: str) -> list[TensorMapping]:
    out = []
    for rule in rules:
        src = f"{scope}{rule.source.format(bn=bn)}"
        dst = f"{target}{rule.target}"
        if rule.transform == "bn":
            out.extend(TensorMapping(f"{src}/{tf}", f"{dst}.{pt}", "copy") for tf, pt in official.BN_FIELDS)
        else:
            out.append(TensorMapping(src, dst, rule.transform))
    return out


def official_plan(
    arch: str, num_classes: int, prefix: str, bn: str = "tpu_batch_normalization"
) -> tuple[TensorMapping, ...]:
    """Every tensor of the native model of `arch`, with its official source name."""
    root = f"{prefix}/" if prefix else ""
    plan = _expand_rules(official.STEM, root, "", bn)
    for block in spec.blocks(arch):
        rules = official.EXPAND_BLOCK if block.has_expand else official.PLAIN_BLOCK
        scope = root + official.BLOCK_SCOPE.format(index=block.index) + "/"
        target = official.BLOCK_TARGET.format(index=block.index) + "."
        plan += _expand_rules(rules, scope, target, bn)
    plan += _expand_rules(official.HEAD, root, "", bn)
    if num_classes:
        plan += _expand_rules(official.CLASSIFIER, root, "", bn)
    targets = [m.target for m in plan]
    if len(set(targets)) != len(targets):
        raise AssertionError("mapping tables fill a target twice")
    return tuple(plan)


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


def classify_unused(names: Sequence[str]) -> dict[str, str]:
    """A reason for each source variable no mapping used."""
    reasons = {}
    for name in names:
        if name in official.KNOWN_GLOBALS:
            reasons[name] = "training counter"
        elif any(name.endswith(suffix) for suffix, _ in official.KNOWN_EXTRAS):
            reasons[name] = next(r for s, r in official.KNOWN_EXTRAS if name.endswith(s))
        else:
            reasons[name] = "unknown variable"
    return reasons


def official_shapes(
    arch: str, num_classes: int, prefix: str, bn: str = "tpu_batch_normalization"
) -> dict[str, tuple[int, ...]]:
    """Official name -> TF shape of every model variable, derived from the native model."""
    from effconv.models.efficientnet import model_tensor_shapes

    targets, _ = model_tensor_shapes(arch, num_classes)
    return {
        m.source: transforms.source_shape(m.transform, targets[m.target])
        for m in official_plan(arch, num_classes, prefix, bn)
    }
