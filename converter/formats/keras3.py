"""Keras 3 sources: `.keras` archives (`model.save`) and `.weights.h5` files (`save_weights`); SavedModels in
`effconv.formats.saved_model`. Their registry entries are `ARCHIVE` and `WEIGHTS`.

Every Keras 3 container keys its weights by position or object path, not by layer name; each format opens
its container as a `Keras3Reader`, which lists the weights under readable names (`<models>/<layer>/<variable>`:
`stem_conv/kernel`, or `efficientnetb0/stem_conv/kernel` inside a user's model) wherever the container
says them, and knows how to build the model's `KerasModel` (`effconv.formats.keras3_model`). The plan,
card, inspect report and arch detection are common to all of them (`Keras3Format`).

Conversion needs neither TensorFlow nor Keras. `verify` runs Keras 3 itself as the reference
(`effconv.formats.keras3_reference`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np

from effconv.errors import CheckpointError, UsageError
from effconv.formats.base import Detected, OpenedSource, SourcePlan, TensorInfo
from effconv.formats.keras3_graph import (
    choose_arch,
    from_config,
    from_names,
    from_store,
    store_archs,
    store_names,
)
from effconv.formats.keras3_model import (
    KerasGraph,
    KerasModel,
    detect,
    fold_input,
    head_description,
    output_description,
    padding_facts,
    plan,
    split,
    table_of,
)
from effconv.formats.keras3_store import Keras3WeightsStore, NotKeras3, VarsGroup
from effconv.mappings import keras
from effconv.models import spec

OPTIMIZER_REASON = "optimizer state"
WEIGHTS_SUFFIX = ".weights.h5"


class Keras3Reader:
    """A reader under readable names (`names`: the underlying key -> its name; others keep theirs).

    `build(arch)` gives the model (`KerasModel`); `facts` go into the card's `source`; `reasons` say why a
    key that no model tensor reads is there (a second copy, the object graph, a Dropout's seed state).
    """

    def __init__(
        self,
        reader,
        names: Mapping[str, str],
        build: Callable[[str | None], KerasModel],
        facts: dict,
        reasons: Mapping[str, str] | None = None,
    ):
        self.inner = reader
        self.checksummed = getattr(reader, "checksummed", False)
        self._to_inner: dict[str, str] = {}
        for key in reader.keys():
            name = names.get(key, key)
            if name in self._to_inner:
                raise CheckpointError(f"two weights of the model are both named {name!r}")
            self._to_inner[name] = key
        self._from_inner = {v: k for k, v in self._to_inner.items()}
        self.build = build
        self.facts = facts
        self.reasons = {self._from_inner.get(k, k): r for k, r in (reasons or {}).items()}

    def name_of(self, key: str) -> str:
        """The readable name of an underlying key."""
        return self._from_inner.get(key, key)

    def keys(self) -> list[str]:
        return list(self._to_inner)

    def info(self, name: str):
        inner = self._to_inner.get(name)
        if inner is None:
            raise CheckpointError(f"no weight {name!r} in the model")
        info = self.inner.info(inner)
        return dataclasses.replace(info, name=name)

    def read(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        return self.inner.read(self._to_inner[name], out=out)

    def values(self, name: str) -> list[float]:
        return np.asarray(self.read(name), dtype=np.float64).reshape(-1).tolist()


class Keras3Format:
    """What every Keras 3 container shares once its reader is open: plan, card, inspect, arch detection."""

    name = "keras3"
    title = "Keras 3"

    def _model(self, source: OpenedSource, arch: str | None) -> tuple[KerasModel, Detected]:
        reader: Keras3Reader = source.reader
        model = reader.build(arch)
        return model, detect(model, lambda key: reader.info(key).shape, arch)

    def _reasons(self, reader: Keras3Reader, model: KerasModel) -> dict[str, str]:
        reasons = dict(reader.reasons)
        for layer in model.pre:
            for key in layer.weights.values():
                reasons[key] = keras.NORMALIZATION_REASON
        for key in reader.keys():
            if key.startswith("optimizer/") or ".OPTIMIZER_SLOT" in key:
                reasons.setdefault(key, OPTIMIZER_REASON)
        return reasons

    def _facts(self, source: OpenedSource, model: KerasModel, arch: str) -> dict:
        scope = model.backbone_scope
        facts = dict(source.reader.facts)
        facts |= {
            "keras_model": model.graph.model,
            "backbone": "/".join(scope) if scope else model.graph.model,
            "layers_from": model.graph.graph,
            "head": head_description(model),
            "output": output_description(model),
            "output_activation": model.activation,
        }
        return facts | padding_facts(model, arch) | model.graph.facts

    def detect(self, shapes: Mapping[str, tuple[int, ...]], arch: str | None = None) -> Detected:
        """From names and shapes alone (`verify --weights`): readable names, or a store's class-keyed ones."""
        keys = list(shapes)
        shape = lambda k: tuple(shapes[k])  # noqa: E731
        stem = f"{keras.KERAS3_FIRST_LAYER}/kernel"
        if not any(k == stem or k.endswith("/" + stem) for k in keys):  # a weights file without layer names
            by_owner: dict[str, VarsGroup] = {}
            stored = [k for k in keys if "/vars/" in k and k.rpartition("/")[2].isdigit()]
            for key in sorted(stored, key=lambda k: (k.rpartition("/vars/")[0], int(k.rpartition("/")[2]))):
                owner = key.rpartition("/vars/")[0]
                by_owner.setdefault(owner, VarsGroup(owner, None)).datasets.append(key)
            groups = list(by_owner.values())
            chosen = choose_arch(groups, shape, arch)
            dense = [shape(g.datasets[0]) for g in groups if g.kind == "dense" and g.datasets]
            classes = dense[0][-1] if len(dense) == 1 and len(dense[0]) == 2 else 0
            sizes = len(spec.blocks(chosen)), spec.stem_channels(chosen), spec.head_channels(chosen)
            return Detected.of(chosen, classes, *sizes)
        graph = KerasGraph([], "model", "names and shapes")
        model = from_names(keys, shape, graph)
        return detect(model, shape, arch)

    def plan(self, source, shapes, arch, ema, allow_mixed) -> SourcePlan:
        from effconv.ema_policy import EmaChoice

        if ema != "auto":
            raise UsageError(f"--ema {ema} applies to TF checkpoints; a Keras model holds one copy of each weight")
        model, detected = self._model(source, arch)
        mapping = plan(model, detected.arch, detected.num_classes)
        choice = EmaChoice("as stored", {m.source: m.source for m in mapping}, 0, len(mapping))
        norm = fold_input(model, source.reader.values)
        reasons = self._reasons(source.reader, model)
        table = dataclasses.replace(table_of(detected.arch), known_names=tuple(reasons.items()))
        card = {"weights": "as stored", "weights_policy": ema, "mixed_variables": [], "source": {}}
        card["source"] = self._facts(source, model, detected.arch)
        card["input_normalization"] = norm.to_card()
        return SourcePlan(detected, mapping, choice, table, card, (norm.mean, norm.std))

    def inspect(self, source: OpenedSource, infos: Mapping[str, TensorInfo]) -> dict:
        model, detected = self._model(source, None)
        needed = {m.source for m in plan(model, detected.arch, detected.num_classes)}
        norm = fold_input(model, source.reader.values)
        reasons = self._reasons(source.reader, model)
        unknown = sorted(k for k in infos if k not in needed and k not in reasons)
        facts = self._facts(source, model, detected.arch)
        return facts | {
            "family": detected.family,
            "arch": detected.arch,
            "num_classes": detected.num_classes,
            "blocks": detected.num_blocks,
            "model_variables": len(needed),
            "missing": sorted(n for n in needed if n not in infos),
            "unknown_variables": unknown,
            "input_normalization": {"mean": norm.mean, "std": norm.std, **norm.to_card()},
        }

    def describe(self, report: dict) -> list[str]:
        lines = [f"format:      {self.title} ({report.get('saved_as')}, Keras {report.get('keras_version')})"]
        if report.get("arch") is None:
            return lines
        norm = report["input_normalization"]
        rounded = lambda values: [round(v, 4) for v in values]  # noqa: E731
        head = ", ".join(f"{h['layer']} ({h['class']})" for h in report.get("head", [])) or "none"
        model = report["keras_model"]
        if report["backbone"] != model:
            model = f"{model}, backbone {report['backbone']}"
        lines += [
            f"arch:        {report['arch']} ({report['blocks']} blocks)",
            f"model:       {model} (layers: {report['layers_from']})",
            f"classes:     {report['num_classes'] or 'no classifier head'}",
            f"head:        {head}",
            f"output:      {report['output']}",
            f"input:       (x - {rounded(norm['mean'])}) / {rounded(norm['std'])} on 0-255 RGB, folded from "
            f"{', '.join(s.split(' ', 1)[0] for s in norm['steps']) or 'no input layers'}",
            f"built for:   {report.get('built_input_size') or 'no fixed input size'}",
        ]
        if norm.get("note"):
            lines.append(f"note:        {norm['note']}")
        return lines

    def tf_reference(self, source: OpenedSource, arch: str, ema: str, allow_mixed: bool, say):
        """Keras 3 itself runs the source (`keras3_reference`), every weight as stored."""
        from effconv.ema_policy import EmaChoice
        from effconv.formats.keras3_reference import reference

        model, detected = self._model(source, arch)
        names = [m.source for m in plan(model, detected.arch, detected.num_classes)]
        keras_model = reference(self.name, source.location, model, detected, say)
        return keras_model, detected, EmaChoice("as stored", {n: n for n in names}, 0, len(names))


# --- .keras -------------------------------------------------------------------------------------------


class KerasArchiveFormat(Keras3Format):
    """A Keras 3 `.keras` archive: the graph from config.json, the weights read in place from the zip."""

    name = "keras3-archive"
    title = "Keras 3 .keras archive"

    def sniff(self, path: Path) -> bool:
        return path.suffix.lower() == ".keras"

    def local_files(self, path: Path) -> tuple[Path, ...]:
        return (path,) if path.is_file() else ()

    @contextlib.contextmanager
    def open(self, path: Path) -> Iterator[OpenedSource]:
        from effconv.formats.keras_archive import KerasArchive

        with KerasArchive(path) as archive:
            w = archive.weights
            with Keras3WeightsStore(w.path, start=w.start, size=w.size, label=w.label) as store:
                graph, names = from_config(archive.config, store.groups, w.label)
                facts = {"saved_as": "model.save (.keras)", "keras_version": archive.keras_version}
                facts["weights_in_archive"] = "read in place" if w.path == archive.path else "compressed: extracted"
                reader = Keras3Reader(store, names, lambda _arch: split(graph), facts)
                yield OpenedSource(self, reader, (path,), path, path)


# --- .weights.h5 ---------------------------------------------------------------------------------------


class KerasWeightsFormat(Keras3Format):
    """A Keras 3 `.weights.h5` (`save_weights`): no graph inside; keras.applications' architecture assumed."""

    name = "keras3-weights"
    title = "Keras 3 .weights.h5"

    def sniff(self, path: Path) -> bool:
        return path.name.lower().endswith(WEIGHTS_SUFFIX)

    def local_files(self, path: Path) -> tuple[Path, ...]:
        return (path,) if path.is_file() else ()

    @contextlib.contextmanager
    def open(self, path: Path) -> Iterator[OpenedSource]:
        try:
            store = Keras3WeightsStore(path)
        except NotKeras3 as e:
            if not e.legacy:
                raise
            from effconv.formats import keras as legacy  # a Keras 2 file named .weights.h5

            with legacy.FORMAT.open(path) as source:
                yield source
            return
        with store:
            shape = lambda key: store.info(key).shape  # noqa: E731
            groups = store.groups
            _, readable, _ = store_names(groups, None)
            if not readable:  # written before Keras 3.6: no layer names, rebuilt when the arch is clear
                fitting, _ = store_archs(groups, shape)
                if len(fitting) == 1:
                    _, readable, _ = store_names(groups, fitting[0])
            root = next((g.name for g in groups if g.path == ""), None) or "not named in this file"
            graph_note = "keras.applications' graph assumed (a weights file holds no graph)"

            def build(arch: str | None) -> KerasModel:
                chosen = choose_arch(groups, shape, arch)
                layer_names, _, how = store_names(groups, chosen)
                graph = KerasGraph([], root, f"{graph_note}; layer names: {how}")
                graph.facts["arch_from"] = "--arch" if arch is not None else "the weights' shapes"
                return from_store(groups, layer_names, reader.name_of, shape, graph, chosen)

            facts = {"saved_as": "save_weights (.weights.h5)", "keras_version": "unknown (not in a weights file)"}
            reader = Keras3Reader(store, readable, build, facts)
            yield OpenedSource(self, reader, (path,), path, path)


ARCHIVE = KerasArchiveFormat()
WEIGHTS = KerasWeightsFormat()
