"""A Keras 3 model's layers, from what its container holds: `config.json` (a `.keras` archive), the layer names
and classes of a weights store alone (`.weights.h5`), or variable names alone (a SavedModel).

- `from_config`: the graph itself: every layer's class, name, config and inputs, nested Functional and
  Sequential models flattened in order. A weights store keys a layer by its class and position in its model;
  walking the config in the same order gives each store group its layer (and checks the `name` it carries).
- `from_store`: a `.weights.h5` without its graph: the layer names its groups carry, or, in files written before
  Keras 3.6, the keras.applications architecture rebuilt from the mapping table (the weight layers of each
  class in model order), the arch detected from the class counts and the stem and head widths.
- `from_names`: `<layer>/<variable>` names and shapes alone (a SavedModel's object graph).

The last two know no layer order beyond keras.applications' own: they assume its input steps (noted in the
card) and a head of pooling and one Dense. EfficientNetB0..B7 store their Normalization's values; EfficientNetV2
builds its input layers with constants of keras.applications' code (`keras.KERAS3_CODED_INPUT`), which are
assumed where the container shows the layers (a weights file's weightless groups, a SavedModel's constants).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Mapping
from functools import cache

from effconv.errors import CheckpointError, UsageError
from effconv.formats.keras3_model import (
    KerasGraph,
    KerasModel,
    KLayer,
    compensating_rescaling,
    constructor,
    detect,
    keras_archs,
    split,
    variables_of,
)
from effconv.formats.keras3_store import VarsGroup, snake_case
from effconv.mappings import engine, keras
from effconv.models import spec

_CONTAINERS = ("Functional", "Sequential")
_BACKBONE = re.compile(keras.KERAS3_BACKBONE_LAYER)
_NORMALIZATION = re.compile(keras.NORMALIZATION_LAYER)
_BN_FIELDS = {source for source, _ in keras.BN_FIELDS}
RESCALING_255 = "keras.applications' Rescaling(1/255) (its scale is in the model's config, not in this container)"
# The classes a weights file may hold around a keras.applications EfficientNet, by the name it keys them by.
_CLASSES = {
    snake_case(c): c
    for c in (
        "InputLayer",
        "Rescaling",
        "Normalization",
        "ZeroPadding2D",
        "Conv2D",
        "BatchNormalization",
        "Activation",
        "DepthwiseConv2D",
        "GlobalAveragePooling2D",
        "GlobalMaxPooling2D",
        "Reshape",
        "Multiply",
        "Dropout",
        "Add",
        "Dense",
        *_CONTAINERS,
    )
}


def _history(obj) -> list[str]:
    """The layers a config's inbound nodes name (`keras_history`), in order."""
    if isinstance(obj, dict):
        found = []
        if isinstance(obj.get("config"), dict) and "keras_history" in obj["config"]:
            return [str(obj["config"]["keras_history"][0])]
        for value in obj.values():
            found += _history(value)
        return found
    if isinstance(obj, list):
        return [name for item in obj for name in _history(item)]
    return []


def _outputs(config: Mapping) -> list[str]:
    outputs = config.get("output_layers") or []
    if outputs and isinstance(outputs[0], str):
        outputs = [outputs]
    return [str(o[0]) for o in outputs if isinstance(o, list) and o]


def _size(shape) -> tuple[int | None, int | None] | None:
    if isinstance(shape, list) and len(shape) == 4 and (shape[1] or shape[2]):
        return shape[1], shape[2]
    return None


def from_config(config: Mapping, groups: list[VarsGroup], where: str) -> tuple[KerasGraph, dict[str, str]]:
    """The graph of `config.json`, and each store dataset's readable name (`<models>/<layer>/<variable>`)."""
    by_path = {g.path: g for g in groups}
    layers: list[KLayer] = []
    names: dict[str, str] = {}
    input_size: list = []

    def walk(entry: Mapping, prefix: str, scope: tuple[str, ...]) -> None:
        kind, cfg = entry.get("class_name"), entry.get("config") or {}
        model = cfg.get("name") or entry.get("name") or "model"
        if kind not in _CONTAINERS or not isinstance(cfg.get("layers"), list):
            raise CheckpointError(
                f"{where}: the model {model!r} is a {kind}; effconv reads Functional and Sequential models "
                "(a subclassed model's config does not hold its layers)"
            )
        entries = cfg["layers"]
        counters: dict[str, int] = {}
        previous = None
        for item in entries:
            lkind, lcfg = str(item.get("class_name")), item.get("config") or {}
            name = str(lcfg.get("name") or item.get("name"))
            if lkind == "InputLayer" and not input_size:
                input_size.append(_size(lcfg.get("batch_shape") or lcfg.get("batch_input_shape")))
            if lkind == "InputLayer" and kind == "Sequential":  # not among a Sequential's layers: no store group
                previous = name
                continue
            snake = snake_case(lkind)
            counters[snake] = counters.get(snake, -1) + 1
            path = f"{prefix}layers/{snake}" + (f"_{counters[snake]}" if counters[snake] else "")
            inbound = tuple(_history(item.get("inbound_nodes"))) if kind == "Functional" else None
            if lkind in _CONTAINERS:
                walk(item, f"{path}/", (*scope, name))
            else:
                group = by_path.get(path)
                if group is not None and group.name is not None and group.name != name:
                    raise CheckpointError(
                        f"{where}: config.json and the weights disagree: {path} holds {group.name!r}, "
                        f"the graph says {name!r}"
                    )
                keys = group.datasets if group is not None else []
                readable = "/".join((*scope, name))
                weights = {}
                for variable, key in variables_of(lkind, lcfg, keys, readable).items():
                    names[key] = weights[variable] = f"{readable}/{variable}"
                layers.append(KLayer(lkind, name, lcfg, weights, scope, inbound, previous))
            previous = name
        if kind == "Functional":
            outputs = _outputs(cfg)
            if len(outputs) != 1:
                raise CheckpointError(f"{where}: the model {model!r} has {len(outputs)} outputs; effconv takes one")
            if entries and outputs[0] != str((entries[-1].get("config") or {}).get("name") or entries[-1].get("name")):
                raise CheckpointError(f"{where}: the model {model!r} outputs {outputs[0]}, not its last layer")

    walk(config, "", ())
    root = str((config.get("config") or {}).get("name") or "model")
    graph = KerasGraph(
        layers, root, "the graph saved in the archive (config.json)", input_size[0] if input_size else None
    )
    return graph, names


# --- a weights file without its graph -----------------------------------------------------------------------


def _container(path: str) -> str:
    """The model path a layer group sits in: `layers/functional/layers/conv2d` -> `layers/functional/`."""
    return path[: path.rfind("layers/")]


def backbone_prefix(groups: list[VarsGroup]) -> str:
    """The path of the model holding the EfficientNet's layers (`""` or `layers/functional/`)."""
    prefixes = {_container(g.path) for g in groups if g.kind == "depthwise_conv2d"}
    if not prefixes:
        raise CheckpointError("not a keras.applications EfficientNet: the weights file holds no DepthwiseConv2D layer")
    if len(prefixes) > 1:
        raise CheckpointError(f"the weights file holds several EfficientNet backbones ({', '.join(sorted(prefixes))})")
    return prefixes.pop()


def _kernel_shape(groups: dict[str, VarsGroup], path: str, shape: Callable[[str], tuple[int, ...]]):
    group = groups.get(path)
    return shape(group.datasets[0]) if group is not None and group.datasets else None


_WEIGHT_KINDS = ("conv2d", "depthwise_conv2d", "batch_normalization")  # a backbone's weight layers, by class


@cache
def backbone_layers(arch: str) -> tuple[tuple[str, str], ...]:
    """(layer name, class) of the weight layers of keras.applications' `arch` backbone, in model order.

    The mapping table's rows, in order, are those layers: a layer whose rows are batch-norm fields is a
    BatchNormalization, another takes its class from its kernel row's transform.
    """
    table, fields = keras.KERAS3_TABLES[spec.get_arch(arch).family]
    rows: dict[str, list] = {}
    for m in engine.source_plan(table, arch, 0, **fields):
        layer, _, variable = m.source.rpartition("/")
        rows.setdefault(layer, []).append((variable, m.transform))
    out = []
    for layer, variables in rows.items():
        if any(v in _BN_FIELDS for v, _ in variables):
            kind = "BatchNormalization"
        else:
            kind = keras.KERAS3_KERNEL_CLASS[next(t for v, t in variables if v == "kernel")]
        out.append((layer, kind))
    return tuple(out)


def _signature(arch: str) -> tuple[int, ...]:
    """What a weights file without layer names shows of `arch`: its weight layers per class, stem and head widths."""
    counts = Counter(snake_case(kind) for _, kind in backbone_layers(arch))
    return (*(counts[k] for k in _WEIGHT_KINDS), spec.stem_channels(arch), spec.head_channels(arch))


def store_archs(groups: list[VarsGroup], shape: Callable[[str], tuple[int, ...]]) -> tuple[list[str], str]:
    """The keras.applications archs whose weight layers (class counts), stem and head fit the store's."""
    fitting, found = store_sizes(groups, shape)
    convs, depthwise, norms, stem, head = found
    described = (
        f"{convs} Conv2D, {depthwise} DepthwiseConv2D and {norms} BatchNormalization layers, "
        f"stem {stem} and head {head} channels"
    )
    return fitting, described


def store_sizes(groups: list[VarsGroup], shape: Callable[[str], tuple[int, ...]]) -> tuple[list[str], tuple]:
    """(the fitting archs, (Conv2D, DepthwiseConv2D, BatchNormalization layers, stem and head channels)).

    Counted in the model that holds the backbone. EfficientNetB0 and EfficientNetV2B0 have as many depthwise
    convs (16) and the same stem and head widths: the class counts of all three kinds tell them apart.
    """
    prefix = backbone_prefix(groups)
    by_path = {g.path: g for g in groups}
    inside = [g for g in groups if _container(g.path) == prefix]
    counts = Counter(g.kind for g in inside if g.kind in _WEIGHT_KINDS)
    convs = [g for g in inside if g.kind == "conv2d"]
    last = max(convs, key=lambda g: int(g.path.rsplit("_", 1)[1]) if g.path[-1].isdigit() else 0, default=None)
    stem = _kernel_shape(by_path, f"{prefix}layers/conv2d", shape)
    head = _kernel_shape(by_path, last.path, shape) if last else None
    if stem is None or head is None or len(stem) != 4 or len(head) != 4:
        raise CheckpointError("not a keras.applications EfficientNet: no 4-D stem and head conv kernels")
    found = (*(counts[k] for k in _WEIGHT_KINDS), stem[3], head[3])
    return [a for a in keras_archs() if _signature(a) == found], found


def choose_arch(groups: list[VarsGroup], shape: Callable[[str], tuple[int, ...]], arch: str | None) -> str:
    fitting, described = store_archs(groups, shape)
    if arch is not None:
        wanted = spec.get_arch(arch).name
        if wanted not in fitting:
            held = f"it holds {', '.join(fitting)}" if fitting else "it fits no keras.applications EfficientNet"
            raise UsageError(f"--arch {wanted} given, but the weights file has {described}: {held}")
        return wanted
    if not fitting:
        raise CheckpointError(
            f"the weights file has {described}, which fits none of keras.applications' "
            f"{', '.join(keras.KERAS_APPLICATIONS)} that effconv reads"
        )
    if len(fitting) > 1:
        raise UsageError(
            f"the weights file ({described}) fits {', '.join(fitting)} and holds no layer names: name it with --arch"
        )
    return fitting[0]


def rebuilt_names(groups: list[VarsGroup], arch: str) -> dict[str, str]:
    """Layer group path -> the keras.applications layer name there, for the weight layers of `arch`'s backbone.

    A weights file keys a layer by its class and its position among that class's layers in the model: the
    backbone's weight layers in model order (`backbone_layers`) give that sequence.
    """
    prefix = backbone_prefix(groups)
    counters: dict[str, int] = {}
    out = {}
    for layer, kind in backbone_layers(arch):
        snake = snake_case(kind)
        counters[snake] = counters.get(snake, -1) + 1
        out[f"{prefix}layers/{snake}" + (f"_{counters[snake]}" if counters[snake] else "")] = layer
    return out


def store_names(groups: list[VarsGroup], arch: str | None) -> tuple[dict[str, str], dict[str, str], str]:
    """(group path -> layer name, dataset -> readable name, how the names were found) for a weights file.

    The names the groups carry when every layer group has one; else keras.applications' names rebuilt for
    the arch (`arch`, or detected from the shapes by the caller), other layers named by their store key.
    """
    layer_groups = [g for g in groups if g.path]
    if layer_groups and all(g.name is not None for g in layer_groups):
        layer_names = {g.path: g.name for g in layer_groups}
        how = "the layer names the weights file carries"
    else:
        if arch is None:
            return {}, {}, "no layer names in the file"
        layer_names = {g.path: g.path.rsplit("/", 1)[-1] for g in layer_groups}
        layer_names |= rebuilt_names(groups, arch)
        how = f"keras.applications {constructor(arch)}'s layers, rebuilt (the file holds no layer names)"
    readable: dict[str, str] = {}
    for g in layer_groups:
        if _CLASSES.get(g.kind) in _CONTAINERS:
            continue
        scope = _scope(g.path, layer_names)
        kind = _CLASSES.get(g.kind, g.kind)
        for variable, key in variables_of(kind, {}, g.datasets, layer_names[g.path]).items():
            readable[key] = "/".join((*scope, layer_names[g.path], variable))
    return layer_names, readable, how


def _scope(path: str, layer_names: Mapping[str, str]) -> tuple[str, ...]:
    parts = path.split("/")
    return tuple(layer_names.get("/".join(parts[: i + 2]), parts[i + 1]) for i in range(0, len(parts) - 2, 2))


# --- keras.applications' input layers whose constants are in its code (EfficientNetV2) -----------------------

CODED_INPUT_NOTE = (
    "keras.applications' {constructor} preprocessing (include_preprocessing=True): its constants are in "
    "keras.applications' code and the model's config, not in this container, which {shows}"
)
NO_INPUT_LAYERS = (
    "no input layers: keras.applications' {constructor} built with include_preprocessing=False ({shows}); "
    "the model takes its input as given"
)


def coded_input(arch: str, note: str) -> list[KLayer]:
    """keras.applications' input layers of `arch` as its code builds them (`keras.KERAS3_CODED_INPUT`); the
    first carries the note, which speaks for all of them."""
    layers = [KLayer(kind, name, dict(config)) for kind, name, config in keras.KERAS3_CODED_INPUT[arch]]
    layers[0].note = note
    return layers


def _coded_store_input(arch: str, inside: list[VarsGroup], graph: KerasGraph) -> list[KLayer]:
    """The input layers of a weights file's EfficientNetV2: its (weightless) Rescaling and Normalization groups
    say whether keras.applications built them; their constants are keras.applications'."""
    kinds = ("rescaling", "normalization")
    found = Counter(g.kind for g in inside if g.kind in kinds)
    wanted = Counter(snake_case(kind) for kind, _, _ in keras.KERAS3_CODED_INPUT[arch])
    stored = [g for g in inside if g.kind in kinds and g.datasets]
    name = constructor(arch)
    if stored:
        raise CheckpointError(
            f"the backbone's {_CLASSES[stored[0].kind]} layer ({stored[0].path}) holds weights; keras.applications' "
            f"{name} builds its input layers with constants; convert the .keras archive"
        )
    shown = ", ".join(f"{found[k]} {_CLASSES[k]}" for k in kinds)
    if found == wanted:
        return coded_input(arch, CODED_INPUT_NOTE.format(constructor=name, shows=f"holds its {shown} layers"))
    if not found:
        graph.facts["input_layers"] = NO_INPUT_LAYERS.format(constructor=name, shows="the weights file holds none")
        return []
    raise CheckpointError(
        f"the backbone has {shown} layers; keras.applications' {name} has "
        f"{', '.join(f'{wanted[k]} {_CLASSES[k]}' for k in kinds)} (or none with include_preprocessing=False)"
    )


def _coded_graph_input(arch: str, constant: Callable[[list[float]], str | None], graph: KerasGraph) -> list[KLayer]:
    """The input layers of a SavedModel's EfficientNetV2, shown by its serving graph's float constants
    (`constant(values)`: the name of a constant equal to them, or None): all of them, or none.

    A Rescaling shows by its scale; its offset (S-L's -1, an int in keras.applications' code) is traced as an
    int constant, and is keras.applications' wherever its scale is.
    """
    layers = coded_input(arch, "")
    wanted: list[tuple[str, list[float]]] = []
    for layer in layers:
        if layer.kind == "Rescaling":
            wanted.append((f"{layer.name}'s scale", [layer.config["scale"]]))
        else:
            wanted += [(f"{layer.name}'s {k}", list(layer.config[k])) for k in ("mean", "variance")]
    found = {what: constant(values) for what, values in wanted}
    graph.facts["input_constants"] = {what: name or "not found" for what, name in found.items()}
    name = constructor(arch)
    if all(found.values()):
        shows = f"shows them: its constants {', '.join(found.values())}"
        layers[0].note = CODED_INPUT_NOTE.format(constructor=name, shows=shows)
        return layers
    if not any(found.values()):
        graph.facts["input_layers"] = NO_INPUT_LAYERS.format(
            constructor=name, shows="none of its constants is in the serving graph"
        )
        return []
    missing = ", ".join(what for what, got in found.items() if not got)
    raise CheckpointError(
        f"the serving graph holds some of keras.applications' {name} input constants but not {missing}: "
        "its input normalisation is unknown; convert the .keras archive"
    )


def from_store(
    groups: list[VarsGroup],
    layer_names: Mapping[str, str],
    key: Callable[[str], str],
    shape: Callable[[str], tuple[int, ...]],
    graph: KerasGraph,
    arch: str,
) -> KerasModel:
    """The model a weights file holds, keras.applications' `arch` graph assumed around its layers."""
    prefix = backbone_prefix(groups)
    layer_groups = [g for g in groups if g.path and _CLASSES.get(g.kind) not in _CONTAINERS]
    unknown = sorted({g.kind for g in layer_groups if g.kind not in _CLASSES and not g.kind.startswith("random_")})
    if unknown:
        raise CheckpointError(
            f"the weights file holds {', '.join(unknown)} layers; without the model's config effconv reads only "
            "a keras.applications EfficientNet with a head of pooling, Dropout and one Dense (convert the .keras)"
        )
    if any(g.kind == "global_max_pooling2d" for g in layer_groups):
        raise CheckpointError("the model pools by maximum (GlobalMaxPooling2D); the converted EfficientNet averages")
    inside = [g for g in layer_groups if _container(g.path) == prefix]
    outside = [g for g in layer_groups if _container(g.path) != prefix]
    for g in outside:
        if g.kind in ("rescaling", "normalization"):
            raise CheckpointError(
                f"the model has a {_CLASSES[g.kind]} layer ({layer_names.get(g.path, g.path)}) outside the "
                "keras.applications backbone: its place and constants are in the model's config, not in a "
                "weights file; convert the .keras archive"
            )

    def layer(g: VarsGroup) -> KLayer:
        kind = _CLASSES.get(g.kind, g.kind)
        name = layer_names.get(g.path, g.path.rsplit("/", 1)[-1])
        raw = variables_of(kind, {}, g.datasets, name)
        weights = {v: key(k) for v, k in raw.items()}
        config = (
            {"units": shape(raw["kernel"])[-1], "activation": None, "activation_known": False}
            if kind == "Dense"
            else {}
        )
        note = "its activation is in the model's config, not in a weights file" if kind == "Dense" else None
        return KLayer(kind, name, config, weights, _scope(g.path, layer_names), note=note)

    if arch in keras.KERAS3_CODED_INPUT:
        pre = _coded_store_input(arch, inside, graph)
    else:
        rescalings = [g for g in inside if g.kind == "rescaling"]
        normalizations = [layer(g) for g in inside if g.kind == "normalization"]
        if len(rescalings) not in (1, 2) or len(normalizations) != 1:
            raise CheckpointError(
                f"the backbone has {len(rescalings)} Rescaling and {len(normalizations)} Normalization layers; "
                "keras.applications' EfficientNet has one and one (two Rescaling when built with weights='imagenet')"
            )
        pre = [
            KLayer("Rescaling", "rescaling", {"scale": 1 / 255.0, "offset": 0.0}, note=RESCALING_255),
            *normalizations,
        ]
        if len(rescalings) == 2:
            note = "keras.applications' compensating Rescaling of weights='imagenet' (a second Rescaling in the file)"
            pre.append(compensating_rescaling("rescaling_1", note))
    weighted = [layer(g) for g in layer_groups if g.datasets and g.kind != "normalization"]
    backbone = [lay for lay in weighted if _BACKBONE.match(lay.name) and lay.kind != "Dense"]
    dense = [lay for lay in weighted if lay.kind == "Dense"]
    other = [lay for lay in weighted if lay not in backbone and lay not in dense]
    if other:
        raise CheckpointError(
            f"the model has a {other[0].kind} layer ({other[0].name}) that is no part of keras.applications' "
            "EfficientNet; effconv converts a head of pooling, Dropout and one Dense"
        )
    named = all(g.name is not None for g in layer_groups)
    dropouts = [
        layer(g)
        for g in (layer_groups if named else outside)
        if g.kind == "dropout" and not _BACKBONE.match(layer_names.get(g.path, ""))
    ]
    head = _assumed_head(_pooled(inside, outside, dense), dropouts, dense)
    return assemble(graph, pre, backbone, head)


def _pooled(inside: list[VarsGroup], outside: list[VarsGroup], dense: list[KLayer]) -> bool:
    if dense:
        return True
    blocks = sum(1 for g in inside if g.kind == "depthwise_conv2d")
    squeezes = sum(1 for g in inside if g.kind == "global_average_pooling2d")  # one per block (its SE), + avg_pool
    return squeezes > blocks or any(g.kind == "global_average_pooling2d" for g in outside)


def _assumed_head(pooled: bool, dropouts: list[KLayer], dense: list[KLayer]) -> list[KLayer]:
    if len(dense) > 1:
        raise CheckpointError(
            f"the model holds {len(dense)} Dense layers ({', '.join(d.name for d in dense)}); without the model's "
            "config their order is unknown; effconv converts a head of one Dense (convert the .keras archive)"
        )
    head = [KLayer("GlobalAveragePooling2D", "avg_pool", note="assumed")] if pooled else []
    return head + (dropouts if dense else []) + dense


def assemble(graph: KerasGraph, pre: list[KLayer], backbone: list[KLayer], head: list[KLayer]) -> KerasModel:
    """A model from its parts (containers without a graph), checked as `split` checks a graph."""
    last = KLayer("Activation", keras.KERAS3_LAST_LAYER, note="assumed")
    backbone = sorted(backbone, key=lambda layer: layer.name != keras.KERAS3_FIRST_LAYER)  # the stem first
    graph.layers = [*pre, *backbone, last, *head]
    if not any(layer.name == keras.KERAS3_FIRST_LAYER for layer in backbone):
        raise CheckpointError(f"not a keras.applications EfficientNet: no '{keras.KERAS3_FIRST_LAYER}' layer")
    return split(graph)


# --- names alone (a SavedModel) ------------------------------------------------------------------------------


def group_names(keys: list[str]) -> dict[str, dict[str, str]]:
    """`[<models>/]<layer>/<variable>` names -> {layer: {variable: key}} (other keys left out).

    Keras 3 names a variable by its path, which holds the models around its layer where the layer was
    built inside them (`sequential/dense/kernel`); layer names are unique in a model.
    """
    layers: dict[str, dict[str, str]] = {}
    for key in keys:
        parts = key.split("/")
        if len(parts) < 2 or key.startswith("_") or ".ATTRIBUTES" in key:
            continue
        variables = layers.setdefault(parts[-2], {})
        if parts[-1] in variables:
            raise CheckpointError(f"two layers named {parts[-2]} hold a {parts[-1]} ({variables[parts[-1]]}, {key})")
        variables[parts[-1]] = key
    return layers


def from_names(
    keys: list[str],
    shape: Callable[[str], tuple[int, ...]],
    graph: KerasGraph,
    *,
    arch: str | None = None,
    constant: Callable[[list[float]], str | None] | None = None,
    compensated: str | None = None,
    pooled: bool = True,
    activation: str | None = None,
    activation_note: str | None = None,
    rescaling_note: str = RESCALING_255,
) -> KerasModel:
    """The model that `<layer>/<variable>` names show, keras.applications' graph assumed around them.

    `arch`: the --arch given (the names and shapes must agree); `constant(values)`: the name of a constant of the
    serving graph equal to `values`, or None (EfficientNetV2's input constants are found there; without it they
    are assumed); `compensated`: why the graph is known to hold keras.applications' compensating Rescaling (None:
    it does not); `pooled`: whether the model pools (its output is 2-D) where it has no Dense.
    """
    layers = group_names(keys)
    normalization = [name for name in layers if _NORMALIZATION.fullmatch(name)]
    backbone, dense = [], []
    for name, weights in layers.items():
        if _BACKBONE.match(name):
            kind = "BatchNormalization" if set(weights) & _BN_FIELDS else "Conv2D"
            backbone.append(KLayer(kind, name, weights=weights))
        elif name not in normalization and "kernel" in weights and len(shape(weights["kernel"])) == 2:
            config = {
                "units": shape(weights["kernel"])[1],
                "activation": activation,
                "activation_known": bool(activation),
            }
            dense.append(KLayer("Dense", name, config, weights, note=activation_note))
    head = _assumed_head(pooled, [], dense)
    chosen = detect(assemble(graph, [], backbone, head), shape, arch).arch
    if chosen in keras.KERAS3_CODED_INPUT:
        if normalization:
            raise CheckpointError(
                f"the model's Normalization layer {normalization[0]} stores its mean and variance, which "
                f"keras.applications' {constructor(chosen)} never does: its place in the model is in the model's "
                "config, not in this container; convert the .keras archive"
            )
        if constant is None:  # names alone: keras.applications' default assumed
            note = CODED_INPUT_NOTE.format(constructor=constructor(chosen), shows="is assumed to hold them")
            pre = coded_input(chosen, note)
        else:
            pre = _coded_graph_input(chosen, constant, graph)
        return assemble(graph, pre, backbone, head)
    if len(normalization) != 1:
        raise CheckpointError(
            f"expected one Normalization layer's mean and variance, found {len(normalization)} ({normalization})"
        )
    pre = [
        KLayer("Rescaling", "rescaling", {"scale": 1 / 255.0, "offset": 0.0}, note=rescaling_note),
        KLayer("Normalization", normalization[0], weights=layers[normalization[0]]),
    ]
    if compensated:
        pre.append(compensating_rescaling("rescaling_1", compensated))
    return assemble(graph, pre, backbone, head)
