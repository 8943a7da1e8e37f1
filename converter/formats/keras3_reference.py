"""Keras 3 itself as `effconv verify`'s reference for Keras 3 sources (`.keras`, `.weights.h5`, SavedModel).

For each input size, a container gives Keras layers in three parts (`Pieces`): the per-pixel steps before the
backbone (Rescaling, Normalization, ...), the backbone as a Keras model from its first layer's input
(`stem_conv_pad`, or EfficientNetV2's `stem_conv`) to every endpoint (`stem_activation`, each block's last layer,
`top_activation`), and the head after it (pooling, Dropout, the Dense classifier, an output Activation). The
endpoints line up with effconv's as for legacy `.h5` files (`keras_reference`); the logits are the Dense's output
before its activation, as the converted model returns logits.

- `.keras`: `keras.saving.load_model` (safe mode). Where its graph takes the size as built (the size it was built
  for; any size for an EfficientNetV2, which pads 'same'), its own layers run. Elsewhere the backbone is
  keras.applications' rebuilt for the size (its ZeroPadding2D values TF 'SAME' there, as the converted model pads),
  the loaded layers' weights copied by name, between the loaded model's own input steps and head.
- `.weights.h5`: keras.applications' model of the detected arch built for the size (nested in a Sequential with
  the Dropout and Dense the file holds, where its backbone is nested, as in a fine-tuned model), and Keras'
  own `load_weights`.
- SavedModel: `tf.saved_model.load`; keras.applications' backbone rebuilt for the size with the variables
  TensorFlow restored (by layer and variable name), the input steps and head the source's reader found.

Wherever the source itself runs at the size (the loaded model, the weights file's model, the SavedModel's
serving signature), the three parts must reproduce its own output, as logits (a live model's head run linear; a
SavedModel's softmax compared by its logarithm), to `SELF_CHECK_RTOL` times the largest logit (at least 1), on
seeded 0-255 pixels once per size and on every batch verify runs: a reference that does not compute what the
source computes would vouch for nothing, so a mismatch is a parity failure (exit 1). A size the source does not
take (a SavedModel's serving signature is fixed) runs the rebuilt model alone, and the notes say so.

The converted model takes input already normalised; the Keras graph normalises inside. As `keras_reference`
does, the reference maps its input back through the graph's own steps before the backbone, measured on them
(a per-channel affine map), so both sides see the same tensor at the stem.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from effconv.errors import ParityError, UsageError, one_line
from effconv.formats.keras3_model import KerasModel, KLayer, constructor
from effconv.formats.keras_reference import _block_outputs
from effconv.mappings import keras as rows
from effconv.models import spec

STEM_PAD = "stem_conv_pad"  # EfficientNetB0..B7's, before stem_conv; its padding is fixed when the graph is built
ENDPOINT_LAYERS = {"stem": "stem_activation", "head_1x1": rows.KERAS3_LAST_LAYER}
# The three parts against the source's own output, as logits: a live Keras model runs the very same ops (measured
# difference 0); a SavedModel's traced graph sums in its own order, 3e-6 of the largest logit at most (the
# keras3-b0 fixture's export on 0-255 noise, logits up to 115: 3.4e-4; a fine-tuned B0 and a V2B0 at 64 px: 7e-7
# and 3e-7 of theirs). A step the reference lacks moves the logits by far more (inverted pixels: 18 to 30 times
# the limit on a random B0, whose logits hardly depend on its input).
SELF_CHECK_RTOL = 1e-4
_IDENTITY = {"Dropout", "SpatialDropout2D", "GaussianDropout", "GaussianNoise", "AlphaDropout"}


def keras3():
    """Keras 3 (`import keras`), imported on first use: only verify of a Keras 3 source needs it."""
    try:
        import keras
    except ImportError as e:
        raise UsageError(
            f"verify of a Keras 3 source runs Keras 3 itself and needs it ({e}): pip install 'effconv[tf]' 'keras>=3'"
        ) from e
    version = str(getattr(keras, "__version__", "unknown"))
    major = version.split(".")[0]
    if not major.isdigit() or int(major) < 3 or not hasattr(keras, "saving"):
        raise UsageError(
            f"verify of a Keras 3 source runs Keras 3 itself, but `import keras` gives Keras {version} here "
            "(legacy Keras cannot load Keras 3 files): pip install 'keras>=3'"
        )
    return keras


@dataclass
class Pieces:
    """One input size's reference: the Keras layers to run, and the source's own forward pass to check them by.

    `own(raw)` is the source itself on raw pixels (None: it does not run at this size). A live Keras model runs with
    its head's activations made linear (`linear_head`), giving logits; a SavedModel's output is the logits after
    `own_activation` (None: the logits or features themselves), or after one of `other_activations` where the
    container does not record the activation.
    """

    pre: list  # Keras layers before the backbone, per pixel, in the order they run
    backbone: object  # keras.Model: the backbone's first input -> {"stem", "block_<i>", "head_1x1"}
    head: list  # Keras layers after top_activation, in order
    how: str  # what runs, for the report's notes
    own: Callable[[np.ndarray], object] | None = None
    own_name: str = "the model"
    own_activation: str | None = None
    other_activations: tuple[str, ...] = ()


@dataclass
class _SizeRecord:
    how: str
    own_name: str | None
    max_diff: float = 0.0
    limit: float = 0.0
    compared: str = ""


class Keras3ReferenceModel:
    """`__call__(x_nhwc, endpoints=False)`: logits (pooled features without a head), or every endpoint.

    `build(height, width)` gives that size's `Pieces`; `notes` say, after the calls, what ran at each size and how
    closely the source's own output was reproduced.
    """

    def __init__(self, build: Callable[[int, int], Pieces], num_classes: int, described: str):
        self._build = build
        self.num_classes = num_classes
        self._described = described
        self._built: dict[tuple[int, int], tuple[Pieces, np.ndarray, np.ndarray]] = {}
        self._records: dict[tuple[int, int], _SizeRecord] = {}

    @property
    def notes(self) -> list[str]:
        out = [self._described]
        for (h, w), record in self._records.items():
            line = f"Keras 3 reference at {h}x{w}: {record.how}"
            if record.own_name is not None:
                line += (
                    f"; {record.own_name} itself gives the reference's {record.compared} to "
                    f"{record.max_diff:.2g} (limit {record.limit:.2g}; on seeded 0-255 pixels and on verify's inputs)"
                )
            out.append(line)
        return out

    def __call__(self, x_nhwc: np.ndarray, endpoints: bool = False):
        x = np.asarray(x_nhwc, dtype=np.float64)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected an NHWC batch with 3 channels, got shape {x.shape}")
        key = (int(x.shape[1]), int(x.shape[2]))
        if key not in self._built:
            pieces = self._build(*key)
            self._built[key] = (pieces, *_input_steps(pieces, *key))
            self._records[key] = _SizeRecord(pieces.how, pieces.own_name if pieces.own is not None else None)
            if pieces.own is not None:  # once on pixels of the source's own range, where a softmax is not saturated
                pixels = np.random.default_rng(0).integers(0, 256, (1, *key, 3)).astype(np.float32)
                _compare_with_source(pieces, pixels, *_forward(pieces, pixels), self._records[key])
        pieces, scale, shift = self._built[key]
        raw = ((x - shift) / scale).astype(np.float32)  # the pixels the graph's own steps turn into x
        out, final = _forward(pieces, raw)
        if pieces.own is not None:
            _compare_with_source(pieces, raw, out, final, self._records[key])
        return out if endpoints else out["logits" if self.num_classes else "pooled_features"]


def _compare_with_source(pieces: Pieces, raw: np.ndarray, out: dict, final: np.ndarray, record: _SizeRecord) -> None:
    """The source's own output on `raw` must be what the reference computes (`final`: its logits, else its pooled
    features or feature map): compared as logits (a softmax output by its logarithm, where float32 holds the
    probability), to SELF_CHECK_RTOL of the largest logit (at least 1); the closest call goes into `record`."""
    own = _numpy(pieces.own(raw))
    logits = "logits" in out
    limit = SELF_CHECK_RTOL * max(1.0, float(np.abs(final).max()) if final.size else 0.0)
    activations = (pieces.own_activation, *pieces.other_activations) if logits else (None,)
    found = []
    for activation in activations:
        theirs, ours = own.astype(np.float64), final.astype(np.float64)
        what = _COMPARED.get(activation, "logits" if logits else "output")
        if theirs.shape != ours.shape:
            found.append(f"{what}: shapes {list(theirs.shape)} and {list(ours.shape)}")
            continue
        if activation == "softmax":  # compared as log-probabilities, where float32 holds them
            held = theirs >= _SMALLEST_PROBABILITY
            shifted = ours - ours.max(axis=-1, keepdims=True)
            ours = (shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True)))[held]
            theirs = np.log(theirs[held])
        elif activation == "sigmoid":  # compared as logits, log(p / (1 - p)), where float32 holds p apart from 0 and 1
            held = (theirs >= _SMALLEST_PROBABILITY) & (theirs <= 1 - _SIGMOID_MARGIN)
            ours, theirs = ours[held], np.log(theirs[held]) - np.log1p(-theirs[held])
        diff = float(np.abs(theirs - ours).max()) if ours.size else float("inf")
        found.append(f"{what}: {diff:.3g}")
        if diff <= limit:
            if not record.limit or diff / limit >= record.max_diff / record.limit:  # the closest call is reported
                record.max_diff, record.limit = diff, limit
            record.compared = what
            return
    raise ParityError(
        f"{pieces.own_name} computes something other than the reference ({pieces.how}), which follows "
        f"keras.applications' graph as the converted model does: max |difference| {'; '.join(found)} "
        f"(limit {limit:.3g})"
    )


_COMPARED = {"softmax": "logits (log softmax)", "sigmoid": "logits (from the sigmoid's output, not recorded)"}
_SIGMOID_MARGIN = 1e-6  # float32 rounds probabilities closer to 1 than this: their logits are not recoverable
_SMALLEST_PROBABILITY = 1e-30  # a float32 probability above this holds its logit to float32 precision


def _numpy(value) -> np.ndarray:
    return np.asarray(keras3().ops.convert_to_numpy(value))


def _input_steps(pieces: Pieces, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The steps before the backbone as one per-channel affine map, measured: y = scale * x + shift.

    Measured across a pixel's range (0 and 255), not one unit: the difference of two float32 outputs near 1 would
    give a scale of 1/255 only to 1e-5 of itself, and the stem's input 4e-5 off.
    """

    def run(value: float) -> np.ndarray:
        y = np.full((1, height, width, 3), value, np.float32)
        for layer in pieces.pre:
            y = layer(y, training=False)
        return _numpy(y).astype(np.float64)[0, 0, 0]

    span = 255.0
    shift = run(0.0)
    scale = (run(span) - shift) / span
    if np.any(scale <= 0):
        raise UsageError(f"the Keras graph's input steps scale a channel by {scale.tolist()}: cannot invert them")
    return scale, shift


@contextlib.contextmanager
def linear_head(layers: list):
    """The head's Dense and Activation layers with their activations made linear while Keras runs them: the Dense
    then gives the logits, and a whole model run meanwhile gives them too."""
    keras = keras3()
    saved = [(layer, layer.activation) for layer in layers if type(layer).__name__ in ("Dense", "Activation")]
    for layer, _ in saved:
        layer.activation = keras.activations.get("linear")
    try:
        yield
    finally:
        for layer, activation in saved:
            layer.activation = activation


def _forward(pieces: Pieces, raw: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every endpoint, and the last one (the logits, else the pooled features or feature map) for the check."""
    y = raw
    for layer in pieces.pre:
        y = layer(y, training=False)
    taps = pieces.backbone(y, training=False)
    out = {k: _numpy(v) for k, v in taps.items()}
    out["features"] = out[f"block_{sum(k.startswith('block_') for k in out) - 1}"]
    z = taps["head_1x1"]
    with linear_head(pieces.head):
        for layer in pieces.head:
            z = layer(z, training=False)
            kind = type(layer).__name__
            if kind == "GlobalAveragePooling2D":
                out["pooled_features"] = _numpy(z)
            elif kind == "Dense":
                out["logits"] = _numpy(z)
    if "pooled_features" not in out:  # a feature extractor without pooling: the converted model's forward pools
        out["pooled_features"] = out["head_1x1"].mean(axis=(1, 2), dtype=np.float64).astype(np.float32)
    return out, _numpy(z)


def _own_linear(model, head: list) -> Callable[[np.ndarray], object]:
    """A live Keras model on raw pixels, its head's activations linear (`linear_head`)."""

    def run(raw: np.ndarray):
        with linear_head(head):
            return model(raw, training=False)

    return run


# --- the backbone in a live Keras model ------------------------------------------------------------------------


def _nesting(model) -> list:
    """The models from `model` down to the one whose own layers hold stem_conv, outermost first ([] if none)."""
    if any(layer.name == rows.KERAS3_FIRST_LAYER for layer in model.layers):
        return [model]
    for layer in model.layers:
        if hasattr(layer, "layers") and (inner := _nesting(layer)):
            return [model, *inner]
    return []


def _around(nesting: list) -> tuple[list, list]:
    """The layers before the backbone and after it, in the order they run, across the nested models."""
    pre, head = [], []
    for i, model in enumerate(nesting):
        layers = [layer for layer in model.layers if type(layer).__name__ != "InputLayer"]
        if i + 1 < len(nesting):
            at = next(j for j, layer in enumerate(layers) if layer is nesting[i + 1])
            pre, head = pre + layers[:at], layers[at + 1 :] + head
        else:
            names = [layer.name for layer in layers]
            first = names.index(STEM_PAD if STEM_PAD in names else rows.KERAS3_FIRST_LAYER)
            pre, head = pre + layers[:first], layers[names.index(rows.KERAS3_LAST_LAYER) + 1 :] + head
    return pre, head


def _backbone(keras, base, num_blocks: int):
    """A Keras model from the input of `base`'s first backbone layer to every endpoint, in `base`'s own graph."""
    names = [layer.name for layer in base.layers]
    blocks = _block_outputs(names)
    if len(blocks) != num_blocks:
        raise UsageError(f"the Keras model has {len(blocks)} blocks, the converted model {num_blocks}")
    layers = {**ENDPOINT_LAYERS, **{f"block_{i}": name for i, name in enumerate(blocks)}}  # one output per tensor
    first = base.get_layer(STEM_PAD if STEM_PAD in names else rows.KERAS3_FIRST_LAYER)
    return keras.Model(first.input, {k: base.get_layer(name).output for k, name in layers.items()})


def _weight_layers(model) -> dict[str, object]:
    return {layer.name: layer for layer in model.layers if layer.weights}


def _application(keras, arch: str, **kwargs):
    """keras.applications' model of `arch` (`weights=None`), its errors (an input under 32 px) as usage errors."""
    name = constructor(arch)
    try:
        return getattr(keras.applications, name)(weights=None, **kwargs)
    except ValueError as e:
        raise UsageError(f"Keras cannot build keras.applications' {name} for verify: {one_line(e)}") from e


def _rebuilt(keras, arch: str, height: int, width: int, num_blocks: int, weights_of: Callable) -> object:
    """keras.applications' `arch` backbone built for height x width, each weight layer's weights from `weights_of`."""
    app = _application(keras, arch, include_top=False, input_shape=(height, width, 3))
    runner = _backbone(keras, app, num_blocks)
    for name, layer in _weight_layers(runner).items():
        try:
            layer.set_weights(weights_of(layer))
        except (KeyError, ValueError) as e:  # a layer the source lacks, or weights of other shapes
            raise UsageError(
                f"keras.applications' {constructor(arch)} rebuilt for {height}x{width} cannot take the source's "
                f"weights for its layer {name}: {one_line(str(e))}"
            ) from e
    return runner


def _accepts(shape, height: int, width: int) -> bool:
    return shape is not None and len(shape) == 4 and shape[1] in (None, height) and shape[2] in (None, width)


def _size(shape) -> str:
    """`shape`'s height x width as the notes say it: '224x224', '224 x any', or 'no fixed size'."""
    if shape is None or len(shape) != 4 or (shape[1] is None and shape[2] is None):
        return "no fixed size"
    h, w = ("any" if d is None else str(d) for d in shape[1:3])
    return f"{h}x{w}" if "any" not in (h, w) else f"{h} x {w}"


# --- .keras -----------------------------------------------------------------------------------------------------


class _Archive:
    """A `.keras` archive loaded by Keras: its own layers where its graph takes the size, else rebuilt (Keras reads
    the graph itself: the reader's view of it, `_model`, is not needed)."""

    def __init__(self, keras, path: Path, _model: KerasModel, arch: str, num_blocks: int):
        self.keras, self.arch, self.num_blocks = keras, arch, num_blocks
        try:
            self.model = keras.saving.load_model(path, compile=False)
        except Exception as e:  # Keras raises every kind of error for a file it cannot load
            raise UsageError(f"Keras 3 cannot load {path} for verify: {one_line(e, max_lines=3)}") from e
        nesting = _nesting(self.model)
        if not nesting:
            raise UsageError(f"the model Keras loads from {path} has no {rows.KERAS3_FIRST_LAYER} layer")
        self.pre, self.head = _around(nesting)
        self.runner = _backbone(keras, nesting[-1], num_blocks)
        self.shape = tuple(self.model.inputs[0].shape) if self.model.inputs else None
        self.same_padding = spec.get_arch(arch).family in rows.KERAS3_SAME_PADDING

    def __call__(self, height: int, width: int) -> Pieces:
        built = _size(self.shape)
        own = (self.shape is not None and tuple(self.shape[1:3]) == (height, width)) or self.same_padding
        if own and _accepts(self.shape, height, width):
            how = f"the loaded model's own layers (its graph built for {built})"
            return Pieces(self.pre, self.runner, self.head, how, _own_linear(self.model, self.head), "the loaded model")
        loaded = _weight_layers(self.runner)
        runner = _rebuilt(
            self.keras, self.arch, height, width, self.num_blocks, lambda layer: loaded[layer.name].get_weights()
        )
        if set(_weight_layers(runner)) != set(loaded):
            missing = sorted(set(_weight_layers(runner)) ^ set(loaded))
            raise UsageError(f"keras.applications' {constructor(self.arch)} and the loaded model differ in {missing}")
        if self.same_padding:
            why = f"the loaded graph takes {built} only"
        elif built == "no fixed size":
            why = "the loaded graph was built without an input size: its ZeroPadding2D values are those of even maps"
        else:
            why = f"the loaded graph's ZeroPadding2D values are fixed for {built}"
        how = (
            f"keras.applications' {constructor(self.arch)} rebuilt for {height}x{width} with the loaded layers' "
            f"weights (by name), between the loaded input steps and head ({why})"
        )
        return Pieces(self.pre, runner, self.head, how)


# --- .weights.h5 ------------------------------------------------------------------------------------------------


class _WeightsFile:
    """keras.applications' model of the arch, built for each size, and Keras' own `load_weights` of the file."""

    def __init__(self, keras, path: Path, model: KerasModel, arch: str, num_blocks: int):
        self.keras, self.path, self.arch, self.num_blocks = keras, path, arch, num_blocks
        self.classes = model.num_classes
        self.pooled = any(layer.kind == "GlobalAveragePooling2D" for layer in model.head)
        self.dropouts = sum(layer.kind in _IDENTITY for layer in model.head)
        self.nested = bool(model.backbone_scope)

    def _model(self, height: int, width: int):
        keras, layers = self.keras, self.keras.layers
        shape = (height, width, 3)
        if self.nested:  # a fine-tuned model: the application nested in a Sequential, then the user's head
            pooling = "avg" if self.pooled else None
            app = _application(keras, self.arch, include_top=False, input_shape=shape, pooling=pooling)
            head = [layers.Dropout(0.0) for _ in range(self.dropouts)]
            head += [layers.Dense(self.classes)] if self.classes else []
            return keras.Sequential([keras.Input(shape), app, *head])
        inputs = keras.Input(shape)
        y = _application(keras, self.arch, include_top=False, input_tensor=inputs).output
        y = layers.GlobalAveragePooling2D(name="avg_pool")(y) if self.pooled else y
        for i in range(self.dropouts):
            y = layers.Dropout(0.0, name=f"top_dropout_{i}")(y)
        y = layers.Dense(self.classes, name="predictions")(y) if self.classes else y
        return keras.Model(inputs, y)

    def describe(self) -> str:
        name = constructor(self.arch)
        parts = [f"{self.dropouts} Dropout"] * bool(self.dropouts) + [f"Dense({self.classes})"] * bool(self.classes)
        if self.nested:
            pooled = ", pooling='avg'" if self.pooled else ""
            return f"Sequential([{name}(include_top=False{pooled}), {', '.join(parts)}])"
        top = ["GlobalAveragePooling2D"] * self.pooled + parts
        return f"{name}(include_top=False) + {', '.join(top) or 'no head'}"

    def __call__(self, height: int, width: int) -> Pieces:
        model = self._model(height, width)
        try:
            model.load_weights(self.path)
        except Exception as e:  # Keras raises ValueError, KeyError, ... for a file that does not fit the model
            raise UsageError(
                f"Keras 3 cannot load {self.path} into keras.applications' {self.describe()} for verify "
                f"({one_line(e, max_lines=2)}); verify the .keras archive instead"
            ) from e
        nesting = _nesting(model)
        pre, head = _around(nesting)
        runner = _backbone(self.keras, nesting[-1], self.num_blocks)
        how = f"{self.describe()} built for {height}x{width}, the file loaded by Keras' load_weights"
        return Pieces(pre, runner, head, how, _own_linear(model, head), "that model")


# --- SavedModel -------------------------------------------------------------------------------------------------


class _SavedModel:
    """keras.applications' backbone with the variables TensorFlow restores from the SavedModel, checked against its
    serving signature where that takes the size."""

    def __init__(self, keras, folder: Path, model: KerasModel, arch: str, num_blocks: int):
        import tensorflow as tf

        self.keras, self.tf, self.arch, self.num_blocks, self.model = keras, tf, arch, num_blocks, model
        try:
            loaded = tf.saved_model.load(str(folder))
        except Exception as e:  # TensorFlow raises its own errors for a SavedModel it cannot load
            raise UsageError(
                f"TensorFlow cannot load the SavedModel {folder} for verify: {one_line(e, max_lines=3)}"
            ) from e
        self.loaded = loaded  # keeps the restored variables and functions alive
        self.values: dict[str, np.ndarray] = {}
        by_layer: dict[str, list[str]] = {}
        for obj in tf.train.TrackableView(loaded).descendants():
            if isinstance(obj, tf.Variable):
                name = obj.name.removesuffix(":0")
                if name not in self.values:  # model.export tracks every weight twice, under one name
                    self.values[name] = obj.numpy()
                    by_layer.setdefault("/".join(name.split("/")[-2:]), []).append(name)
        self.by_layer = by_layer
        signature = loaded.signatures.get("serving_default")
        inputs = signature.structured_input_signature[1] if signature is not None else {}
        if signature is None or len(inputs) != 1 or len(signature.structured_outputs) != 1:
            raise UsageError(f"the SavedModel {folder} has no serving_default signature of one input and one output")
        (self.input_name, spec_), (self.output_name,) = next(iter(inputs.items())), list(signature.structured_outputs)
        self.serve, self.shape = signature, tuple(spec_.shape.as_list())
        self.pre = [layer for layer in map(self._pre_layer, model.pre) if layer is not None]
        self.head = [layer for layer in map(self._head_layer, model.head) if layer is not None]

    def _value(self, full_name: str) -> np.ndarray:
        if full_name not in self.values:
            raise UsageError(f"TensorFlow restored no variable {full_name!r} from the SavedModel")
        return self.values[full_name]

    def _weights_of(self, layer) -> list[np.ndarray]:
        out = []
        for variable in layer.weights:
            found = self.by_layer.get(f"{layer.name}/{variable.name}", [])
            if len(found) != 1:
                held = f"{len(found)} variables ({', '.join(found)})" if found else "no variable"
                raise UsageError(f"the SavedModel holds {held} for keras.applications' {layer.name}/{variable.name}")
            out.append(self.values[found[0]])
        return out

    def _pre_layer(self, layer: KLayer):
        layers, cfg = self.keras.layers, layer.config
        if layer.kind == "Rescaling":
            return layers.Rescaling(scale=cfg.get("scale", 1.0), offset=cfg.get("offset", 0.0))
        if layer.kind == "Normalization":
            if cfg.get("mean") is not None:
                mean, variance = cfg["mean"], cfg["variance"]
            else:
                mean, variance = self._value(layer.weights["mean"]), self._value(layer.weights["variance"])
            return layers.Normalization(mean=mean, variance=variance)
        return None  # the stem's ZeroPadding2D is the backbone's; random augmentation is identity at inference

    def _head_layer(self, layer: KLayer):
        layers = self.keras.layers
        if layer.kind == "GlobalAveragePooling2D":
            return layers.GlobalAveragePooling2D()
        if layer.kind == "Dense":
            kernel, bias = self._value(layer.weights["kernel"]), self._value(layer.weights["bias"])
            dense = layers.Dense(kernel.shape[1])  # the logits; the SavedModel's activation is the check's
            dense.build((None, kernel.shape[0]))
            dense.set_weights([kernel, bias])
            return dense
        return None  # Dropout and its kin: identity at inference; the output activation is the check's

    def _own(self, raw: np.ndarray):
        return self.serve(**{self.input_name: self.tf.constant(raw)})[self.output_name]

    def __call__(self, height: int, width: int) -> Pieces:
        runner = _rebuilt(self.keras, self.arch, height, width, self.num_blocks, self._weights_of)
        how = (
            f"keras.applications' {constructor(self.arch)} built for {height}x{width} with the variables TensorFlow "
            "restores from the SavedModel (by layer name), its input steps and head as the SavedModel shows them"
        )
        activation = self.model.activation if self.model.classifier is not None else None
        others = ("sigmoid",) if self.model.classifier is not None and activation is None else ()
        if _accepts(self.shape, height, width):
            own = "the SavedModel's serving signature"
            return Pieces(self.pre, runner, self.head, how, self._own, own, activation, others)
        how += f" (its serving signature takes {_size(self.shape)} only: not run at this size)"
        return Pieces(self.pre, runner, self.head, how)


# --- entry point -----------------------------------------------------------------------------------------------

# Each Keras 3 format's container: how the reference loads it, and what the notes call it.
_CONTAINERS = {
    "keras3-archive": (_Archive, "the .keras archive as keras.saving.load_model loads it"),
    "keras3-weights": (_WeightsFile, "the .weights.h5 file as load_weights loads it"),
    "keras3-saved-model": (_SavedModel, "the SavedModel as tf.saved_model.load restores it"),
}


def reference(
    format_name: str, location: Path, model: KerasModel, detected, say: Callable[[str], None]
) -> Keras3ReferenceModel:
    """The reference for a Keras 3 source (`detected`: arch, classes and blocks as the reader found them);
    Keras, and for a SavedModel TensorFlow, load it here, once."""
    keras = keras3()
    container, what = _CONTAINERS[format_name]
    say(f"Keras {keras.__version__}: loading {location}")
    build = container(keras, location, model, detected.arch, detected.num_blocks)
    described = (
        f"reference: Keras {keras.__version__} ({keras.backend.backend()} backend) runs {what}; its input is the "
        "converted model's, mapped back through the graph's own steps before the backbone (measured per channel); "
        "compared: stem_activation, each block's last layer, top_activation, the pooling, the Dense before its "
        "activation"
    )
    return Keras3ReferenceModel(build, detected.num_classes, described)
