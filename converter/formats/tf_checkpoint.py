"""The official TF1 checkpoint format: what a checkpoint holds (family, arch, prefix, BN scope, classes).

`FORMAT` is this format's entry in the registry (`effconv.formats`): a checkpoint directory,
prefix, `.index` file or tarball, read by `TensorBundleReader` without TensorFlow.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from effconv.errors import CheckpointError, MappingError, UsageError
from effconv.formats.base import Detected, OpenedSource, SourcePlan, TensorInfo
from effconv.mappings import engine, official
from effconv.models import spec

_STEM_KERNEL = "stem/conv2d/kernel"
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
    names: frozenset[str]  # the checkpoint's base variable names (numbered layers are found among them)

    @property
    def detected(self) -> Detected:
        sizes = (self.num_blocks, self.stem_channels, self.head_channels)
        return Detected.of(self.arch, self.num_classes, *sizes, prefix=self.prefix, bn_scope=self.bn)


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


def _named_arch(prefix: str) -> str | None:
    """The arch an official prefix names ("efficientnet-b3" -> "b3"), the longest official name it ends with.

    Regardless of case: the EdgeTPU scopes end in a capital letter ("efficientnet-edgetpu-S").
    """
    names = [n for n in spec.OFFICIAL_NAMES if prefix.lower().endswith(n.lower())]
    return spec.OFFICIAL_NAMES[max(names, key=len)] if names else None


def _holds_every_variable(
    shapes: Mapping[str, tuple[int, ...]], names: frozenset[str], arch: str, num_classes: int, prefix: str, bn: str
) -> bool:
    """True when every variable `arch` needs is there with the shape it needs (CondConv's expert count too).

    `names`: the checkpoint's base variable names, among which the model-wide numbered layers are found.
    """
    try:
        plan = engine.official_plan(arch, num_classes, prefix, bn, names=names)
    except MappingError:
        return False
    want = engine.source_shapes(plan, arch, num_classes)
    return all(_shape(shapes, m.source) == want[m.source] for m in plan)


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
    fitting = spec.archs_of_shape(num_blocks, stem[3], head[3])
    described = f"{num_blocks} blocks, stem {stem[3]} and head {head[3]} channels"
    named = _named_arch(prefix)
    if not fitting:
        raise CheckpointError(f"checkpoint '{prefix}' has {described}, which fits no {spec.KNOWN_MODELS}")
    dense = _shape(shapes, f"{root}head/dense/kernel") or _shape(shapes, f"{root}head_1/dense/kernel")
    num_classes = dense[1] if dense and len(dense) == 2 else 0
    names = frozenset(base_name(n) for n in shapes)
    # Sizes of two families can agree in blocks, stem and head (b0 and lite0): the names then tell.
    complete = [a for a in fitting if _holds_every_variable(shapes, names, a, num_classes, prefix, bn)]
    detected = named if named in fitting else (complete or fitting)[0]
    if named and named not in fitting:
        raise CheckpointError(f"checkpoint prefix says '{prefix}' but its shapes ({described}) are not {named}")
    if arch is not None:
        wanted = spec.get_arch(arch).name
        if wanted != detected:
            raise UsageError(f"--arch {wanted} given, but the checkpoint holds {detected} ('{prefix}', {described})")
    return CheckpointLayout(
        arch=detected,
        prefix=prefix,
        bn=bn,
        num_classes=num_classes,
        num_blocks=num_blocks,
        stem_channels=stem[3],
        head_channels=head[3],
        names=names,
    )


def _global_step(source: OpenedSource, shapes: Mapping[str, tuple[int, ...]], strict: bool) -> int | None:
    """The training step; anything but a scalar integer is a broken checkpoint (`strict`) or unknown (None)."""
    if "global_step" not in shapes:
        return None
    info = source.reader.info("global_step")
    if info.shape != () or info.dtype.kind not in "iu":
        if not strict:
            return None
        raise CheckpointError(
            f"global_step in {source.origin} has shape {info.shape} and dtype {info.dtype_name or info.dtype}; "
            "expected a scalar integer"
        )
    return int(source.reader.read("global_step"))


class TFCheckpointFormat:
    """Official TPU-repo checkpoints (and any trained with that code), EMA shadows included."""

    name = "tf-checkpoint"
    title = "TF checkpoint"

    def sniff(self, path: Path) -> bool:
        return True  # the registry's fallback: resolving the checkpoint says what is wrong with anything else

    def local_files(self, path: Path) -> tuple[Path, ...]:
        from effconv.formats.checkpoint_files import local_checkpoint_files

        return local_checkpoint_files(path)

    @contextlib.contextmanager
    def open(self, path: Path) -> Iterator[OpenedSource]:
        from effconv.formats.bundle import TensorBundleReader
        from effconv.formats.checkpoint_files import resolve_checkpoint

        with resolve_checkpoint(path) as files, TensorBundleReader(files.prefix) as reader:
            yield OpenedSource(self, reader, files.files, files.origin, files.prefix)

    def detect(self, shapes: Mapping[str, tuple[int, ...]], arch: str | None = None) -> Detected:
        return detect_layout(shapes, arch).detected

    def _plan(self, layout: CheckpointLayout) -> tuple[engine.TensorMapping, ...]:
        return engine.official_plan(layout.arch, layout.num_classes, layout.prefix, layout.bn, names=layout.names)

    def plan(self, source, shapes, arch, ema, allow_mixed) -> SourcePlan:
        from effconv.ema_policy import choose_weights

        layout = detect_layout(shapes, arch)
        plan = self._plan(layout)
        choice = choose_weights([m.source for m in plan], shapes, ema, allow_mixed)
        facts = {"prefix": layout.prefix, "bn_scope": layout.bn, "global_step": _global_step(source, shapes, True)}
        card = {"weights": choice.used, "weights_policy": ema, "mixed_variables": list(choice.mixed), "source": facts}
        return SourcePlan(layout.detected, plan, choice, official.TABLE, card)

    def inspect(self, source: OpenedSource, infos: Mapping[str, TensorInfo]) -> dict:
        shapes = {k: i.shape for k, i in infos.items()}
        layout = detect_layout(shapes)
        needed = {m.source for m in self._plan(layout)}
        ema = sum(1 for n in needed if n + official.EMA_SUFFIX in infos)
        raw = sum(1 for n in needed if n in infos)
        model_keys = needed | {n + official.EMA_SUFFIX for n in needed}
        other = engine.classify_unused([k for k in infos if k not in model_keys])
        return {
            "prefix_path": str(source.location),
            "family": layout.detected.family,
            "arch": layout.arch,
            "prefix": layout.prefix,
            "bn_scope": layout.bn,
            "num_classes": layout.num_classes,
            "blocks": layout.num_blocks,
            "model_variables": len(needed),
            "ema_copies": ema,
            "raw_copies": raw,
            "ema": "complete" if ema == len(needed) else ("none" if ema == 0 else "partial"),
            "missing": sorted(n for n in needed if n not in infos and n + official.EMA_SUFFIX not in infos),
            "optimizer_slots": sum(1 for r in other.values() if r == "optimizer slot"),
            "unknown_variables": sorted(k for k, r in other.items() if r == "unknown variable"),
            "global_step": _global_step(source, shapes, False),
        }

    def describe(self, report: dict) -> list[str]:
        return [
            f"arch:        {report['arch']} (prefix '{report['prefix']}', {report['blocks']} blocks, "
            f"batch norm '{report['bn_scope']}')",
            f"classes:     {report['num_classes'] or 'no classifier head'}",
            f"EMA:         {report['ema']} ({report['ema_copies']} EMA / {report['raw_copies']} raw copies "
            f"of {report['model_variables']} model variables)",
            f"global step: {report['global_step']}",
            f"optimizer:   {report['optimizer_slots']} slot variables (ignored on conversion)",
        ]

    def tf_reference(self, source: OpenedSource, arch: str, ema: str, allow_mixed: bool, say):
        """Our TF reference model with weights read by TensorFlow itself, by official name."""
        import tensorflow as tf

        from effconv.ema_policy import choose_weights
        from effconv.models.tf_reference import TFReferenceModel

        say("TensorFlow: reading the checkpoint")
        reader = tf.train.load_checkpoint(str(source.location))
        shapes = {k: tuple(v) for k, v in reader.get_variable_to_shape_map().items()}
        layout = detect_layout(shapes, arch)
        needed = [m.source for m in self._plan(layout)]
        choice = choose_weights(needed, shapes, ema, allow_mixed)
        weights = {n: reader.get_tensor(choice.source_of[n]) for n in needed}
        model = TFReferenceModel(layout.arch, weights, layout.num_classes, layout.bn, layout.prefix)
        return model, layout.detected, choice


FORMAT = TFCheckpointFormat()
