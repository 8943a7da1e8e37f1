"""What a Keras 3 model holds, whatever container it came in: its EfficientNet backbone, the layers before it
(input normalisation) and the head after it, checked and turned into a conversion plan and card facts.

Each container (`.keras` archive, `.weights.h5`, SavedModel) lists its layers as `KLayer`s in model order,
nested models flattened (`KerasGraph`). `split` finds the keras.applications backbone (`stem_conv` ..
`top_activation`, at any depth of nesting) and checks what surrounds it:

- before it: `Rescaling` and `Normalization` (folded into the card's mean/std exactly as the graph computes
  them, `fold_input`), Keras' random augmentation layers (identity at inference), the stem's `ZeroPadding2D`;
- after it (keras.applications' own top, or a user's head): `GlobalAveragePooling2D`, `Dropout` (identity in
  eval mode), one `Dense` (the classifier: any number of classes; its activation is recorded, the converted
  model returns logits) and an `Activation` after it. Anything else is refused, naming the layer class.

The backbone's rows are keras.applications' layer names (`effconv.mappings.keras`); the head's Dense fills the
classifier rows whatever its name.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from effconv.errors import CheckpointError, UsageError
from effconv.formats.base import Detected
from effconv.formats.keras import KERAS_IMAGENET_STD, InputNormalization, _Affine, _channels
from effconv.mappings import engine, keras
from effconv.mappings.engine import TensorMapping
from effconv.models import spec

_BLOCK = re.compile(r"^block(\d+)([a-z])_")
_BACKBONE = re.compile(keras.KERAS3_BACKBONE_LAYER)
_AUGMENTATION = re.compile(r"^Random[A-Z]\w*$")  # keras.layers.RandomFlip, RandomRotation, ...: identity at inference
_AUGMENTATION_CHANGES_SIZE = {"RandomCrop"}  # crops at inference too
_STEM_PAD = ("ZeroPadding2D", "stem_conv_pad")  # EfficientNetB0..B7's own, before the stem (checked in padding_facts)
_IDENTITY_HEAD = {"Dropout", "SpatialDropout2D", "GaussianDropout", "GaussianNoise", "AlphaDropout"}


@dataclass
class KLayer:
    """One layer: its class, name and config, and where each of its variables lies in the reader."""

    kind: str  # the Keras class name ("Conv2D")
    name: str
    config: dict = field(default_factory=dict)  # {} where the container holds no config
    weights: dict[str, str] = field(default_factory=dict)  # variable name ("kernel") -> reader key
    scope: tuple[str, ...] = ()  # the nested models it sits in, outermost first (the root model not named)
    inbound: tuple[str, ...] | None = None  # the layers it reads (None: not recorded, or a Sequential's order)
    previous: str | None = None  # the layer before it in its own model
    note: str | None = None  # why a layer the container does not describe is assumed


@dataclass
class KerasGraph:
    """A model's layers in order, nested models flattened, and what the container says of it."""

    layers: list[KLayer]
    model: str  # the root model's name
    graph: str  # where the layers and their order come from (for the card)
    input_size: tuple[int | None, int | None] | None = None  # (H, W) the graph was built for; None: unknown
    facts: dict = field(default_factory=dict)  # container facts for the card


@dataclass
class KerasModel:
    """The graph, split: input steps, the backbone's layers by name, the head and its classifier."""

    graph: KerasGraph
    pre: list[KLayer]
    backbone: dict[str, KLayer]
    head: list[KLayer]
    classifier: KLayer | None
    output: str  # "logits", "pooled features" or "feature map"
    activation: str | None  # the classifier's activation as the model applies it (None: linear)

    @property
    def num_classes(self) -> int:
        return int(self.classifier.config["units"]) if self.classifier else 0

    @property
    def backbone_scope(self) -> tuple[str, ...]:
        return self.backbone[keras.KERAS3_FIRST_LAYER].scope


def variables_of(kind: str, config: Mapping, keys: list[str], owner: str) -> dict[str, str]:
    """A layer's variable names -> its keys (by position), from its class and config; unknown classes by position."""
    table = keras.KERAS3_VARIABLES.get(kind)
    if table is None:
        return {str(i): key for i, key in enumerate(keys)}
    if config:
        names = [name for name, flag in table if _has(flag, config)]
    else:  # no config: every variable, or only the required ones, as the count says
        required = [name for name, flag in table if flag is None]
        names = required if len(keys) == len(required) else [name for name, _ in table]
    if len(names) != len(keys):
        raise CheckpointError(f"layer {owner} ({kind}) holds {len(keys)} weights, but a {kind} has {len(names)} here")
    return dict(zip(names, keys, strict=True))


def _has(flag: str | None, config: Mapping) -> bool:
    if flag is None:
        return True
    if flag.startswith("-"):
        return config.get(flag[1:]) is None
    return bool(config.get(flag, True))


# --- the split -------------------------------------------------------------------------------------


def _one(layers: list[KLayer], name: str) -> int:
    found = [i for i, layer in enumerate(layers) if layer.name == name]
    if not found:
        raise CheckpointError(
            f"not a keras.applications EfficientNet: no '{name}' layer among the model's {len(layers)} layers"
        )
    if len(found) > 1:
        scopes = ", ".join("/".join(layers[i].scope) or "the top model" for i in found)
        raise CheckpointError(f"the model holds {len(found)} EfficientNet backbones ({scopes}); effconv takes one")
    return found[0]


def split(graph: KerasGraph) -> KerasModel:
    """The backbone, with what comes before and after it checked (see the module's docstring)."""
    layers = graph.layers
    first, last = _one(layers, keras.KERAS3_FIRST_LAYER), _one(layers, keras.KERAS3_LAST_LAYER)
    if last < first:
        raise CheckpointError(f"the model's {keras.KERAS3_LAST_LAYER} comes before its {keras.KERAS3_FIRST_LAYER}")
    backbone = {layer.name: layer for layer in layers[first : last + 1]}
    pre = [layer for layer in layers[:first] if layer.kind != "InputLayer"]
    for layer in pre:
        if layer.kind in ("Rescaling", "Normalization") or (layer.kind, layer.name) == _STEM_PAD:
            continue
        if _AUGMENTATION.match(layer.kind) and layer.kind not in _AUGMENTATION_CHANGES_SIZE:
            continue
        raise CheckpointError(
            f"the model has a {layer.kind} layer ({layer.name}) before the EfficientNet stem; effconv folds only "
            "Rescaling and Normalization (and Keras' random augmentation, inactive at inference) into the input"
        )
    head = [layer for layer in layers[last + 1 :] if layer.kind != "InputLayer"]
    classifier, output, activation = _check_head(head)
    return KerasModel(graph, pre, backbone, head, classifier, output, activation)


def _check_head(head: list[KLayer]) -> tuple[KLayer | None, str, str | None]:
    pooled, classifier, activation = False, None, None
    for layer in head:
        if layer.inbound is not None and layer.previous is not None and layer.inbound != (layer.previous,):
            raise CheckpointError(
                f"the model's head is not a chain: {layer.name} ({layer.kind}) reads {', '.join(layer.inbound)}, "
                f"not {layer.previous}; effconv converts GlobalAveragePooling2D, Dropout and one Dense after the "
                "backbone"
            )
        kind, cfg = layer.kind, layer.config
        if classifier is not None and kind != "Activation" and kind not in _IDENTITY_HEAD:
            raise CheckpointError(
                f"the model has a {kind} layer ({layer.name}) after its Dense classifier {classifier.name}; "
                "effconv converts a head of one Dense"
            )
        if kind == "GlobalAveragePooling2D":
            if pooled or cfg.get("keepdims"):
                raise CheckpointError(f"the head's {layer.name} (GlobalAveragePooling2D) pools twice or keeps dims")
            pooled = True
        elif kind in _IDENTITY_HEAD:
            pass
        elif kind == "Dense":
            if not pooled:
                raise CheckpointError(
                    f"the model's Dense layer {layer.name} reads the unpooled feature map (no GlobalAveragePooling2D "
                    "before it); effconv converts a Dense on the pooled features"
                )
            if "bias" not in layer.weights:
                raise CheckpointError(f"the head's Dense layer {layer.name} has no bias; effconv's classifier has one")
            classifier = layer
            activation = _activation_name(cfg.get("activation"))
        elif kind == "Activation" and classifier is not None:
            activation = _activation_name(cfg.get("activation")) or activation
        else:
            raise CheckpointError(
                f"the model has a {kind} layer ({layer.name}) after the EfficientNet backbone; effconv converts a "
                "head of GlobalAveragePooling2D, Dropout and one Dense"
            )
    output = "logits" if classifier else ("pooled features" if pooled else "feature map")
    return classifier, output, activation


def _activation_name(value) -> str | None:
    if isinstance(value, dict):  # a serialized function
        value = (value.get("config") or {}).get("name") or value.get("class_name")
    if value in (None, "linear"):
        return None
    return str(value)


# --- arch, plan --------------------------------------------------------------------------------------


def _shape(model: KerasModel, layer: str, shapes: Callable[[str], tuple[int, ...]]) -> tuple[int, ...] | None:
    owner = model.backbone.get(layer)
    key = owner.weights.get("kernel") if owner else None
    return shapes(key) if key else None


def keras_archs() -> list[str]:
    return list(keras.KERAS_APPLICATIONS.values())


def constructor(arch: str) -> str:
    """The keras.applications constructor that builds `arch` (`EfficientNetV2S` for v2-s)."""
    name = spec.get_arch(arch).name
    return next(k for k, v in keras.KERAS_APPLICATIONS.items() if v == name)


def detect(model: KerasModel, shapes: Callable[[str], tuple[int, ...]], arch: str | None) -> Detected:
    """Family, arch and classes from the backbone's layer names and shapes; `arch`, when given, must agree."""
    stem = _shape(model, keras.KERAS3_FIRST_LAYER, shapes)
    head = _shape(model, "top_conv", shapes)
    if stem is None or head is None or len(stem) != 4 or len(head) != 4:
        raise CheckpointError("not a keras.applications EfficientNet: no 4-D stem_conv and top_conv kernels")
    blocks = len({m.groups() for name in model.backbone if (m := _BLOCK.match(name))})
    described = f"{blocks} blocks, stem {stem[3]} and head {head[3]} channels"
    fitting = [a for a in spec.archs_of_shape(blocks, stem[3], head[3]) if a in keras_archs()]
    if not fitting:
        raise CheckpointError(
            f"the Keras model has {described}, which fits none of keras.applications' "
            f"{', '.join(keras.KERAS_APPLICATIONS)} that effconv reads"
        )
    if arch is not None and spec.get_arch(arch).name not in fitting:
        raise UsageError(
            f"--arch {spec.get_arch(arch).name} given, but the Keras model holds {fitting[0]} ({described})"
        )
    if len(fitting) > 1 and arch is None:
        raise UsageError(f"the Keras model ({described}) fits {', '.join(fitting)}: name it with --arch")
    chosen = spec.get_arch(arch).name if arch is not None else fitting[0]
    facts = {"keras_model": model.graph.model, "output": model.output}
    return Detected.of(chosen, model.num_classes, blocks, stem[3], head[3], **facts)


def plan(model: KerasModel, arch: str, num_classes: int) -> tuple[TensorMapping, ...]:
    """The family's keras.applications rows over `arch`, each source the reader key of the layer's variable.

    A variable the model lacks keeps its keras.applications name, which `engine.check_plan` then reports.
    """
    table, fields = keras.KERAS3_TABLES[spec.get_arch(arch).family]
    out = []
    for m in engine.source_plan(table, arch, num_classes, **fields):
        layer, _, variable = m.source.rpartition("/")
        owner = model.classifier if layer == keras.CLASSIFIER_LAYER else model.backbone.get(layer)
        key = owner.weights.get(variable) if owner is not None else None
        out.append(TensorMapping(key or m.source, m.target, m.transform))
    return tuple(out)


def table_of(arch: str):
    return keras.KERAS3_TABLES[spec.get_arch(arch).family][0]


# --- input normalisation -------------------------------------------------------------------------------


def _value(value):
    """A config value as Keras serialises it: plain, or a {"class_name": "__numpy__", "config": {"value": ...}}."""
    if isinstance(value, dict):
        inner = value.get("config") or {}
        return inner.get("value", value)
    return value


def fold_input(model: KerasModel, read: Callable[[str], list[float]]) -> InputNormalization:
    """The steps before the stem as the graph computes them, folded into a 0-255 mean/std.

    `read(key)` gives a stored weight's values (a Normalization adapted or loaded, not given in its config).
    """
    affine = _Affine()
    assumed = []
    for layer in model.pre:
        name, cfg = layer.name, layer.config
        if layer.kind == "Rescaling":
            scale = _channels(_value(cfg.get("scale", 1.0)), f"{name}'s scale")
            affine.rescale(scale, _channels(_value(cfg.get("offset", 0.0)), f"{name}'s offset"), name)
        elif layer.kind == "Normalization":
            if cfg.get("invert"):
                raise CheckpointError(f"the Keras graph's {name} inverts the normalisation; not supported")
            axis = cfg.get("axis", -1)
            last = axis if isinstance(axis, int) else (list(axis) or [-1])[-1]
            if last not in (-1, 3):
                raise CheckpointError(f"the Keras graph's {name} normalises along axis {axis}, not channels")
            if cfg.get("mean") is not None and cfg.get("variance") is not None:
                mean, variance = _value(cfg["mean"]), _value(cfg["variance"])
            elif "mean" in layer.weights and "variance" in layer.weights:
                mean, variance = read(layer.weights["mean"]), read(layer.weights["variance"])
            else:
                raise CheckpointError(
                    f"the Keras graph's {name} has no mean/variance: its input normalisation is unknown"
                )
            affine.normalize(_channels(mean, f"{name}'s mean"), _channels(variance, f"{name}'s variance"), name)
        elif layer.kind == "ZeroPadding2D":
            continue
        else:
            affine.steps.append(f"{name} ({layer.kind}): identity at inference")
        if layer.note:
            assumed.append(f"{name}: {layer.note}")
    if not model.pre and model.graph.facts.get("input_layers"):
        assumed.append(model.graph.facts["input_layers"])
    mean, std = affine.mean_std()
    note = "; ".join(assumed) or None
    return InputNormalization(mean, std, model.graph.graph, affine.steps, note)


def compensating_rescaling(name: str, note: str) -> KLayer:
    """keras.applications' extra Rescaling(1/sqrt(ImageNet std)) of a graph built with weights='imagenet'."""
    scale = [1.0 / math.sqrt(s) for s in KERAS_IMAGENET_STD]
    return KLayer("Rescaling", name, {"scale": scale, "offset": 0.0}, note=note)


# --- padding -----------------------------------------------------------------------------------------------


def _same(size: int, kernel: int) -> tuple[int, int]:
    """TF 'SAME' padding (before, after) of a stride-2 conv over `size` pixels."""
    out = -(-size // 2)
    total = max((out - 1) * 2 + kernel - size, 0)
    return total // 2, total - total // 2


def padding_facts(model: KerasModel, arch: str) -> dict:
    """The built input size, and whether the graph's ZeroPadding2D values are TF 'SAME' there (or as for even maps)."""
    size = model.graph.input_size
    facts: dict = {"built_input_size": list(size) if size else None}
    pads = {
        layer.name: layer.config.get("padding")
        for layer in [*model.pre, *model.backbone.values()]
        if layer.kind == "ZeroPadding2D" and layer.config
    }
    same = "the converted model pads like TF 'SAME' at every input size, as keras.applications does when built for it"
    if spec.get_arch(arch).family in keras.KERAS3_SAME_PADDING:
        facts["padding"] = (
            f"keras.applications' {constructor(arch)} pads its convolutions with padding='same' (TF 'SAME' at "
            "every input size), as the converted model does"
        )
        return facts
    if not pads:
        facts["padding"] = same + (
            "" if size else "; the container does not say the size the graph was built for, nor its padding"
        )
        return facts
    strided = [("stem_conv_pad", 3)] + [
        (f"block{f['stage_number']}{f['letter']}_dwconv_pad", b.kernel)
        for b, f in zip(spec.blocks(arch), engine.block_fields(arch), strict=True)
        if b.stride == 2
    ]
    h, w = size if size else (None, None)
    mismatched = []
    for name, kernel in strided:
        even = (kernel // 2 - 1, kernel // 2)
        want = [list(_same(h, kernel) if h else even), list(_same(w, kernel) if w else even)]
        got = pads.get(name)
        if got is not None and [list(p) if isinstance(p, list | tuple) else [p, p] for p in got] != want:
            mismatched.append(name)
        h, w = (-(-h // 2) if h else None), (-(-w // 2) if w else None)
    if size and size[0] and size[1]:
        built = f"the graph's ZeroPadding2D values are TF 'SAME' for {size[0]}x{size[1]}"
    else:
        built = (
            "the graph was built without an input size: its ZeroPadding2D values are those of even-sized maps, "
            "TF 'SAME' only where every stride-2 input is even (sides divisible by 32)"
        )
    if mismatched:
        built = f"the graph's ZeroPadding2D values of {', '.join(mismatched)} are not TF 'SAME' for its built size"
    facts["padding"] = f"{built}; {same}"
    return facts


# --- the card ---------------------------------------------------------------------------------------------


def head_description(model: KerasModel) -> list[dict]:
    """The head's layers as the card lists them: what each is and what the converted model does with it."""
    out = []
    for layer in model.head:
        entry = {"layer": layer.name, "class": layer.kind}
        if layer.kind == "GlobalAveragePooling2D":
            entry["as"] = "the converted model's average pooling"
        elif layer.kind in _IDENTITY_HEAD:
            rate = layer.config.get("rate")
            entry |= ({"rate": rate} if rate is not None else {}) | {"as": "identity (inference)"}
        elif layer.kind == "Dense":
            known = layer.config.get("activation_known", True)
            shown = model.activation or ("linear" if known else "not recorded in this container")
            entry |= {"units": model.num_classes, "activation": shown, "as": "classifier"}
        elif layer.kind == "Activation":
            entry |= {"activation": _activation_name(layer.config.get("activation")) or "linear"}
            entry["as"] = "output activation, not applied: the converted model returns logits"
        if layer.note:
            entry["note"] = layer.note
        out.append(entry)
    return out


def output_description(model: KerasModel) -> str:
    if model.output == "logits":
        if model.activation:
            return f"logits of {model.num_classes} classes; Keras applies {model.activation} to them, effconv does not"
        if not model.classifier.config.get("activation_known", True):
            return f"logits of {model.num_classes} classes (whether Keras applies an activation is not recorded here)"
        return f"logits of {model.num_classes} classes"
    if model.output == "pooled features":
        return "pooled features (a feature extractor: the converted model returns them too)"
    return (
        "the feature map of the head conv (a feature extractor without pooling: the converted model's "
        "forward_features gives it, its forward pools it)"
    )
