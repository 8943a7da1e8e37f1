"""A SavedModel of a Keras 3 model, written by `model.export(dir)` or `tf.saved_model.save(model, dir)`:
its registry entry is `FORMAT`.

The weights are a tensor bundle (`variables/variables.index` + data, read by `TensorBundleReader`) keyed by
object paths (`variables/3/.ATTRIBUTES/VARIABLE_VALUE`, `_operations/17/_kernel/...`). The names live in the
bundle's `_CHECKPOINTABLE_OBJECT_GRAPH` entry: each variable's `full_name` (`stem_conv/kernel`), decoded by
`effconv.formats.tf_protos`. `model.export` saves every weight twice (`variables/<i>` and `_all_variables/<j>`):
one copy is read, and the other must agree in shape, dtype, size and crc32c (both are crc-checked on reading).

A SavedModel holds no Keras config. keras.applications' graph is assumed around the named weights; the serving
graph in `saved_model.pb` tells what the variables cannot: the input size it was built for, whether it pools
(its output's rank), a Softmax on its output, keras.applications' compensating Rescaling of a weights='imagenet'
EfficientNet graph, and an EfficientNetV2's input constants (constants of its traced function).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

from effconv.errors import CheckpointError
from effconv.formats.base import OpenedSource
from effconv.formats.keras import KERAS_IMAGENET_STD
from effconv.formats.keras3 import OPTIMIZER_REASON, Keras3Format, Keras3Reader
from effconv.formats.keras3_graph import RESCALING_255, from_names
from effconv.formats.keras3_model import KerasGraph, KerasModel
from effconv.formats.tf_protos import GraphFacts, graph_facts, object_graph, read_string_scalar

OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
SAVED_MODEL_PB = "saved_model.pb"
_VARIABLE_VALUE = "VARIABLE_VALUE"
_SEED_STATE = "seed_generator_state"


def _optimizer(key: str) -> bool:
    return key.startswith("optimizer/") or ".OPTIMIZER_SLOT" in key


def saved_model_dir(path: Path) -> Path | None:
    """The SavedModel directory `path` names (the directory, or its saved_model.pb), else None."""
    if path.is_dir() and ((path / SAVED_MODEL_PB).is_file() or (path / "saved_model.pbtxt").is_file()):
        return path
    if path.name in (SAVED_MODEL_PB, "saved_model.pbtxt") and path.is_file():
        return path.parent
    return None


def _size(shape: tuple[int, ...] | None) -> tuple[int | None, int | None] | None:
    if shape is None or len(shape) != 4 or (shape[1] <= 0 and shape[2] <= 0):
        return None
    return tuple(d if d > 0 else None for d in shape[1:3])


def _constant(facts: GraphFacts, values: list[float]) -> str | None:
    """The name of a float constant of the serving graph equal to `values` (to float32 rounding), if any."""
    for name, found in facts.constants:
        if len(found) == len(values) and all(
            math.isclose(a, b, rel_tol=1e-6) for a, b in zip(found, values, strict=True)
        ):
            return name
    return None


class SavedModelFormat(Keras3Format):
    """A Keras 3 model's SavedModel (`model.export` or `tf.saved_model.save`)."""

    name = "keras3-saved-model"
    title = "Keras 3 SavedModel"

    def sniff(self, path: Path) -> bool:
        return saved_model_dir(path) is not None

    def local_files(self, path: Path) -> tuple[Path, ...]:
        folder = saved_model_dir(path)
        if folder is None:
            return ()
        variables = folder / "variables"
        shards = sorted(variables.glob("variables.data-*-of-*")) if variables.is_dir() else []
        return tuple(p for p in (folder / SAVED_MODEL_PB, variables / "variables.index", *shards) if p.is_file())

    @contextlib.contextmanager
    def open(self, path: Path) -> Iterator[OpenedSource]:
        from effconv.formats.bundle import TensorBundleReader

        folder = saved_model_dir(path)
        if folder is None:
            raise CheckpointError(f"{path} is not a SavedModel directory (no saved_model.pb)")
        if not (folder / SAVED_MODEL_PB).is_file():
            raise CheckpointError(f"{folder} holds a text saved_model.pbtxt; effconv reads the binary saved_model.pb")
        with TensorBundleReader(folder / "variables" / "variables") as bundle:
            if OBJECT_GRAPH_KEY not in bundle:
                raise CheckpointError(f"{folder}: its variables hold no object graph ({OBJECT_GRAPH_KEY})")
            nodes = object_graph(read_string_scalar(bundle, OBJECT_GRAPH_KEY), str(folder))
            names, reasons, saved_as = self._names(bundle, nodes, folder)
            facts = graph_facts(folder / SAVED_MODEL_PB)
            card_facts = {"saved_as": saved_as, "keras_version": "unknown (not in a SavedModel)"}

            def build(arch: str | None) -> KerasModel:
                return self._model_of(reader, facts, arch)

            reader = Keras3Reader(bundle, names, build, card_facts, reasons)
            yield OpenedSource(self, reader, self.local_files(folder), path, folder)

    @staticmethod
    def _names(bundle, nodes, folder: Path) -> tuple[dict[str, str], dict[str, str], str]:
        """Bundle key -> full name (one copy of each), why the other keys are there, and which writer it was."""
        copies: dict[str, list[str]] = {}
        for node in nodes:
            for attribute, full_name, key in node.attributes:
                if attribute == _VARIABLE_VALUE and full_name and key in bundle:
                    copies.setdefault(full_name, []).append(key)
        names, reasons = {}, {OBJECT_GRAPH_KEY: "the SavedModel's object graph (the variables' names)"}
        for full_name, keys in copies.items():
            # the model's own copy first: an optimizer tracks the variables it trains too
            keys = sorted(set(keys), key=lambda k: (_optimizer(k), k.startswith("_"), k))
            first = bundle.info(keys[0])
            for other in keys[1:]:
                info = bundle.info(other)
                same = (info.shape, info.dtype_name, info.size, info.crc32c)
                if same != (first.shape, first.dtype_name, first.size, first.crc32c):
                    raise CheckpointError(
                        f"{folder}: two copies of {full_name} ({keys[0]}, {other}) hold different values"
                    )
                reasons[other] = f"second copy of {full_name} (same shape, dtype and crc32c as the one read)"
            names[keys[0]] = full_name
            if full_name.endswith("/" + _SEED_STATE):
                reasons[keys[0]] = "a Dropout's random-number state (no weight)"
        for key in bundle.keys():
            if _optimizer(key):
                reasons.setdefault(key, OPTIMIZER_REASON)
        root = {local for _, local in nodes[0].children} if nodes else set()
        saved_as = "model.export (SavedModel)" if "_all_variables" in root else "tf.saved_model.save (SavedModel)"
        return names, reasons, saved_as

    @staticmethod
    def _model_of(reader: Keras3Reader, facts: GraphFacts, arch: str | None) -> KerasModel:
        inputs, outputs = list(facts.inputs.values()), list(facts.outputs.values())
        graph = KerasGraph([], "not named in a SavedModel", "not in a SavedModel: keras.applications' graph assumed")
        graph.input_size = _size(inputs[0]) if len(inputs) == 1 else None
        rank = len(outputs[0]) if len(outputs) == 1 and outputs[0] is not None else None
        compensation = _constant(facts, [1 / math.sqrt(s) for s in KERAS_IMAGENET_STD])
        if compensation:
            compensation = (
                f"keras.applications' compensating Rescaling (weights='imagenet'): the constant {compensation}"
            )
        softmax = facts.ops.get("Softmax", 0) > 0
        rescaling = _constant(facts, [1 / 255.0])
        graph.facts["serving_graph"] = {
            "input_shape": list(inputs[0]) if len(inputs) == 1 and inputs[0] is not None else None,
            "output_shape": list(outputs[0]) if len(outputs) == 1 and outputs[0] is not None else None,
            "rescaling_1_255": rescaling or "not found",
            "softmax": softmax,
        }
        activation_note = (
            "a Softmax op in the serving graph"
            if softmax
            else "no Softmax in the serving graph (another activation would not show)"
        )
        model = from_names(
            reader.keys(),
            lambda key: reader.info(key).shape,
            graph,
            arch=arch,
            constant=lambda values: _constant(facts, values),
            compensated=compensation,
            pooled=rank != 4,
            activation="softmax" if softmax else None,
            activation_note=activation_note,
            rescaling_note=f"the serving graph's constant {rescaling}" if rescaling else RESCALING_255,
        )
        if "input_constants" in graph.facts:  # EfficientNetV2: its own input constants were looked for instead
            del graph.facts["serving_graph"]["rescaling_1_255"]
        return model


FORMAT = SavedModelFormat()
