"""The Keras legacy .h5 format: what a Keras applications EfficientNet holds, and its graph's input normalisation.

`FORMAT` is this format's entry in the registry (`effconv.formats`).

Keras EfficientNet graphs normalise inside the model: `Rescaling(1/255)`, then
`Normalization` with stored mean and variance. Keras applications' own ImageNet
weights store the ImageNet *std* as the variance, so the graph divides by
sqrt(std) (tensorflow#49930); Keras adds a compensating `Rescaling(1/sqrt(std))`
only when it builds the model with `weights="imagenet"`. The converted PyTorch
model takes already-normalised input, so every step before `stem_conv` is folded
into one per-channel mean/std on the 0-255 scale: `(x - mean) / std`.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from effconv.errors import CheckpointError, UsageError
from effconv.formats.base import Detected, OpenedSource, SourcePlan, TensorInfo
from effconv.formats.keras_h5 import KerasH5Reader, is_keras_source
from effconv.mappings import engine, keras
from effconv.models import spec

_BLOCK = re.compile(r"^block(\d+)([a-z])_")
_STEM_KERNEL = "stem_conv/kernel"
_HEAD_KERNEL = "top_conv/kernel"
# What Keras applications' ImageNet files store in their Normalization layer.
KERAS_IMAGENET_MEAN = (0.485, 0.456, 0.406)
KERAS_IMAGENET_STD = (0.229, 0.224, 0.225)  # stored as the variance
KERAS_EPSILON = 1e-7  # Normalization divides by max(sqrt(variance), epsilon)


@dataclass(frozen=True)
class KerasLayout:
    arch: str
    num_classes: int
    depthwise: str  # the depthwise kernel's weight name in this file
    num_blocks: int
    stem_channels: int
    head_channels: int
    normalization: str | None  # the Normalization layer's name

    @property
    def detected(self) -> Detected:
        sizes = (self.num_blocks, self.stem_channels, self.head_channels)
        facts = {"depthwise": self.depthwise, "normalization": self.normalization}
        return Detected.of(self.arch, self.num_classes, *sizes, **facts)


def _single(names: set[str], what: str) -> str | None:
    if len(names) > 1:
        raise CheckpointError(f"the Keras file has several {what} layers ({', '.join(sorted(names))}); expected one")
    return next(iter(names), None)


def detect_keras_layout(shapes: Mapping[str, tuple[int, ...]], arch: str | None = None) -> KerasLayout:
    """Infer arch and classes from layer names and shapes; `arch` (if given) must agree."""
    stem, head = shapes.get(_STEM_KERNEL), shapes.get(_HEAD_KERNEL)
    if stem is None or head is None or len(stem) != 4 or len(head) != 4:
        raise CheckpointError(
            f"not a Keras applications EfficientNet: no 4-D '{_STEM_KERNEL}' and '{_HEAD_KERNEL}' "
            f"among its {len(shapes)} weights"
        )
    num_blocks = len({m.groups() for k in shapes if (m := _BLOCK.match(k))})
    fitting = spec.archs_of_shape(num_blocks, stem[3], head[3])
    described = f"{num_blocks} blocks, stem {stem[3]} and head {head[3]} channels"
    if not fitting:
        raise CheckpointError(f"the Keras file has {described}, which fits no {spec.KNOWN_MODELS}")
    if arch is not None and spec.get_arch(arch).name != fitting[0]:
        raise UsageError(
            f"--arch {spec.get_arch(arch).name} given, but the Keras file holds {fitting[0]} ({described})"
        )
    first_dw = "block1a_dwconv/{}"
    depthwise = next((d for d in keras.DEPTHWISE_NAMES if first_dw.format(d) in shapes), None)
    if depthwise is None:
        raise CheckpointError(f"no depthwise kernel {first_dw.format(keras.DEPTHWISE_NAMES)} in the Keras file")
    dense = shapes.get("predictions/kernel")
    layers = {k.rsplit("/", 1)[0] for k in shapes}
    return KerasLayout(
        arch=fitting[0],
        num_classes=dense[1] if dense and len(dense) == 2 else 0,
        depthwise=depthwise,
        num_blocks=num_blocks,
        stem_channels=stem[3],
        head_channels=head[3],
        normalization=_single({n for n in layers if re.fullmatch(keras.NORMALIZATION_LAYER, n)}, "Normalization"),
    )


@dataclass
class InputNormalization:
    """The graph's steps before `stem_conv`, folded: the graph sees `(x - mean) / std` of raw 0-255 input."""

    mean: list[float]
    std: list[float]
    graph: str
    steps: list[str] = field(default_factory=list)
    note: str | None = None

    def to_card(self) -> dict:
        out = {"folded_into": "preprocessing.mean/std", "graph": self.graph, "steps": self.steps}
        return out | ({"note": self.note} if self.note else {})


def _channels(value, what: str) -> list[float]:
    values = [float(v) for v in (value if isinstance(value, list | tuple) else [value])]
    values = values * 3 if len(values) == 1 else values
    if len(values) != 3:
        raise CheckpointError(f"{what} has {len(values)} values, expected 1 or 3 (RGB)")
    return values


class _Affine:
    """y = scale * x + shift per channel, composed step by step."""

    def __init__(self) -> None:
        self.scale, self.shift, self.steps = [1.0] * 3, [0.0] * 3, []

    def rescale(self, scale: list[float], offset: list[float], name: str) -> None:
        self.scale = [a * s for a, s in zip(self.scale, scale, strict=True)]
        self.shift = [b * s + o for b, s, o in zip(self.shift, scale, offset, strict=True)]
        shown = scale[0] if len(set(scale)) == 1 else scale
        self.steps.append(f"{name} (Rescaling): x * {shown}" + (f" + {offset}" if any(offset) else ""))

    def normalize(self, mean: list[float], variance: list[float], name: str) -> None:
        divisor = [max(math.sqrt(max(v, 0.0)), KERAS_EPSILON) for v in variance]
        self.scale = [a / d for a, d in zip(self.scale, divisor, strict=True)]
        self.shift = [(b - m) / d for b, m, d in zip(self.shift, mean, divisor, strict=True)]
        self.steps.append(f"{name} (Normalization): (x - {mean}) / sqrt({variance})")

    def mean_std(self) -> tuple[list[float], list[float]]:
        if any(a <= 0 for a in self.scale):
            raise CheckpointError(f"the Keras input normalisation has a non-positive scale {self.scale}")
        # + 0.0: no "-0.0" in the card
        return [-b / a + 0.0 for a, b in zip(self.scale, self.shift, strict=True)], [1.0 / a for a in self.scale]


def _is_keras_imagenet(mean: list[float], variance: list[float]) -> bool:
    reference = (*KERAS_IMAGENET_MEAN, *KERAS_IMAGENET_STD)
    return all(abs(a - b) <= 1e-6 for a, b in zip([*mean, *variance], reference, strict=True))


def _stored(reader: KerasH5Reader, layer: str | None) -> tuple[list[float], list[float]]:
    keys = set(reader.keys())
    if layer is None or f"{layer}/mean" not in keys or f"{layer}/variance" not in keys:
        raise CheckpointError(f"{reader.path} has no Normalization mean/variance: its input normalisation is unknown")
    mean = _channels(reader.read(f"{layer}/mean").tolist(), "the Normalization mean")
    return mean, _channels(reader.read(f"{layer}/variance").tolist(), "the Normalization variance")


def _graph_layers(config: dict) -> list[dict]:
    """The saved graph's layers before `stem_conv`, in order."""
    layers = (config.get("config") or {}).get("layers") or []
    names = [(layer.get("config") or {}).get("name") for layer in layers]
    if "stem_conv" not in names:
        raise CheckpointError("the saved Keras graph has no stem_conv layer")
    return layers[: names.index("stem_conv")]


def keras_input_normalization(reader: KerasH5Reader, layout: KerasLayout) -> InputNormalization:
    """Fold the graph's input steps into a 0-255 mean/std, from the saved graph when the file has one."""
    affine = _Affine()
    config = reader.model_config
    if config is None:
        mean, variance = _stored(reader, layout.normalization)
        affine.rescale([1 / 255.0] * 3, [0.0] * 3, "rescaling")
        affine.normalize(mean, variance, layout.normalization or "normalization")
        graph = "keras.applications EfficientNet (a weights-only file does not hold its graph)"
        note = None
        if _is_keras_imagenet(mean, variance):
            plain = _Affine()
            plain.rescale([1 / 255.0] * 3, [0.0] * 3, "rescaling")
            plain.normalize(mean, variance, "normalization")
            affine.rescale([1 / math.sqrt(s) for s in KERAS_IMAGENET_STD], [0.0] * 3, "rescaling_1")
            graph = "keras.applications EfficientNet(weights='imagenet'), whose extra Rescaling undoes the quirk"
            alt_mean, alt_std = plain.mean_std()
            note = (
                "this file stores the ImageNet std as the Normalization variance (tensorflow#49930). "
                "Keras compensates only when it builds the model with weights='imagenet'; a graph built with "
                "weights=None or a file path divides by sqrt(std) instead, i.e. mean "
                f"{[round(v, 6) for v in alt_mean]}, std {[round(v, 6) for v in alt_std]}"
            )
        out_mean, out_std = affine.mean_std()
        return InputNormalization(out_mean, out_std, graph, affine.steps, note)
    for layer in _graph_layers(config):
        kind, cfg = layer.get("class_name"), layer.get("config") or {}
        name = cfg.get("name", "?")
        if kind == "Rescaling":
            affine.rescale(_channels(cfg.get("scale", 1.0), name), _channels(cfg.get("offset", 0.0), name), name)
        elif kind == "Normalization":
            if cfg.get("invert"):
                raise CheckpointError(f"the Keras graph's {name} inverts the normalisation; not supported")
            axis = cfg.get("axis", -1)
            if (axis if isinstance(axis, int) else (list(axis) or [-1])[-1]) not in (-1, 3):
                raise CheckpointError(f"the Keras graph's {name} normalises along axis {axis}, not channels")
            stored = _stored(reader, name) if cfg.get("mean") is None or cfg.get("variance") is None else None
            mean = _channels(cfg["mean"], name) if stored is None else stored[0]
            variance = _channels(cfg["variance"], name) if stored is None else stored[1]
            affine.normalize(mean, variance, name)
        elif kind not in ("InputLayer", "ZeroPadding2D"):
            raise CheckpointError(f"the Keras graph has a {kind} layer ({name}) before stem_conv; cannot fold it")
    out_mean, out_std = affine.mean_std()
    return InputNormalization(out_mean, out_std, "the graph saved in the file (model_config)", affine.steps)


def _rounded(values: list[float]) -> list[float]:
    return [round(v, 4) for v in values]


class KerasH5Format:
    """Keras applications' EfficientNetB0..B7 as legacy HDF5: weights files and whole-model files."""

    name = "keras-h5"
    title = "Keras .h5"

    def sniff(self, path: Path) -> bool:
        return is_keras_source(path)

    def local_files(self, path: Path) -> tuple[Path, ...]:
        return (path,) if path.is_file() else ()

    @contextlib.contextmanager
    def open(self, path: Path) -> Iterator[OpenedSource]:
        with KerasH5Reader(path) as reader:
            yield OpenedSource(self, reader, (path,), path, path)

    def detect(self, shapes: Mapping[str, tuple[int, ...]], arch: str | None = None) -> Detected:
        return detect_keras_layout(shapes, arch).detected

    def _plan(self, layout: KerasLayout):
        return engine.source_plan(keras.TABLE, layout.arch, layout.num_classes, depthwise=layout.depthwise)

    def plan(self, source, shapes, arch, ema, allow_mixed) -> SourcePlan:
        from effconv.ema_policy import EmaChoice

        if ema != "auto":
            raise UsageError(f"--ema {ema} applies to TF checkpoints; a Keras file holds one copy of each weight")
        layout = detect_keras_layout(shapes, arch)
        plan = self._plan(layout)
        choice = EmaChoice("as stored", {m.source: m.source for m in plan}, 0, len(plan))
        norm = keras_input_normalization(source.reader, layout)
        reader = source.reader
        facts = {"saved_as": reader.saved_as, "keras_version": reader.keras_version, "backend": reader.backend}
        facts["padding_note"] = (
            "Keras pads stride-2 convs exactly like TF 'SAME' only when the model has a fixed input shape; "
            "built with input_shape=None (include_top=False) it pads as if every map were even"
        )
        card = {"weights": "as stored", "weights_policy": ema, "mixed_variables": [], "source": facts}
        card["input_normalization"] = norm.to_card()
        return SourcePlan(layout.detected, plan, choice, keras.TABLE, card, (norm.mean, norm.std))

    def inspect(self, source: OpenedSource, infos: Mapping[str, TensorInfo]) -> dict:
        reader = source.reader
        report = {"saved_as": reader.saved_as, "keras_version": reader.keras_version, "backend": reader.backend}
        layout = detect_keras_layout({k: i.shape for k, i in infos.items()})
        norm = keras_input_normalization(reader, layout)
        needed = {m.source for m in self._plan(layout)}
        other = engine.classify_unused([k for k in infos if k not in needed], keras.TABLE)
        return report | {
            "family": layout.detected.family,
            "arch": layout.arch,
            "num_classes": layout.num_classes,
            "blocks": layout.num_blocks,
            "model_variables": len(needed),
            "missing": sorted(n for n in needed if n not in infos),
            "unknown_variables": sorted(k for k, r in other.items() if r == "unknown variable"),
            "input_normalization": {"mean": norm.mean, "std": norm.std, **norm.to_card()},
        }

    def describe(self, report: dict) -> list[str]:
        lines = [f"format:      Keras {report.get('keras_version')} legacy HDF5 {report.get('saved_as')} file"]
        if report.get("arch") is None:
            return lines
        norm = report["input_normalization"]
        lines += [
            f"arch:        {report['arch']} ({report['blocks']} blocks)",
            f"classes:     {report['num_classes'] or 'no classifier head'}",
            f"input:       (x - {_rounded(norm['mean'])}) / {_rounded(norm['std'])} on 0-255 RGB, "
            f"folded from {norm['graph']}",
        ]
        if norm.get("note"):
            lines.append(f"note:        {norm['note']}")
        return lines

    def tf_reference(self, source: OpenedSource, arch: str, ema: str, allow_mixed: bool, say):
        """Keras itself runs the file (`keras_reference.KerasReferenceModel`), every weight as stored."""
        from effconv.ema_policy import EmaChoice
        from effconv.formats.keras_reference import KerasReferenceModel, legacy_keras

        say("Keras: building the model and loading the file")
        legacy_keras()  # a missing tf-keras fails here, before any forward pass
        reader = source.reader
        layout = detect_keras_layout({k: reader.info(k).shape for k in reader.keys()}, arch)
        model = KerasReferenceModel(source.location, layout.arch, layout.num_classes, layout.num_blocks)
        names = [m.source for m in self._plan(layout)]
        return model, layout.detected, EmaChoice("as stored", {n: n for n in names}, 0, len(names))


FORMAT = KerasH5Format()
