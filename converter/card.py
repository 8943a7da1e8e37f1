"""The model card as a type: `X.json` beside the weights, read and checked once.

`ModelCard.from_json` takes the JSON object (a card file, or the dict a conversion
builds) and raises one `UsageError` naming the card and the field for anything a
reader could trip on; `to_json` gives back the object in the key order effconv
writes. A card is editable JSON and may come from an older effconv: only `arch`
and `num_classes` are required; every other field may be missing (None) but, when
present, must have its type. Unknown keys are kept, in `extra`.

A `ModelCard` also reads like the JSON object it was made from (`card["preprocessing"]`
is a dict), so code that knew the card as a dict, `model.card` included, keeps working.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Any

from effconv.errors import UsageError
from effconv.models import spec
from effconv.variants import CROP_PADDING


def _shown(value: Any) -> str:
    """A bad value as the error quotes it: on one line, and short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _is_rgb(v: Any) -> bool:
    return isinstance(v, list | tuple) and len(v) == 3 and all(_is_number(x) for x in v)


# (check, what the error says is expected), by kind of field
_STR = (lambda v: isinstance(v, str), "a string")
_COUNT = (lambda v: _is_int(v) and v >= 0, "an integer >= 0")
_SIZE = (lambda v: _is_int(v) and v > 0, "an integer > 0")
_NUMBER = (_is_number, "a number")
_OBJECT = (lambda v: isinstance(v, Mapping), "a JSON object")
_COUNTS = (lambda v: isinstance(v, Mapping) and all(_is_int(n) and n >= 0 for n in v.values()), "names -> counts")
_STRINGS = (lambda v: isinstance(v, list | tuple) and all(isinstance(x, str) for x in v), "a list of strings")
_MEAN = (_is_rgb, "3 numbers (R, G, B)")
_STD = (lambda v: _is_rgb(v) and all(x != 0 for x in v), "3 non-zero numbers (R, G, B)")
_PADDING = (lambda v: v is None or (_is_int(v) and v >= 0), "an integer >= 0, or null for the newer 0.875 crop")


class _Fields:
    """One JSON object's fields, each checked as it is taken; what is never taken is `rest`."""

    def __init__(self, obj: Any, where: str, prefix: str = ""):
        if not isinstance(obj, Mapping):
            name = f"'{prefix.rstrip('.')}'" if prefix else None
            raise UsageError(
                f"{where} has no valid {name} (got {_shown(obj)}); expected a JSON object"
                if name
                else f"{where} is not a JSON object"
            )
        self.obj, self.where, self.prefix, self.taken = obj, where, prefix, set()

    def error(self, key: str, value: Any, expected: str) -> UsageError:
        return UsageError(f"{self.where} has no valid '{self.prefix}{key}' (got {_shown(value)}); expected {expected}")

    def take(self, key: str, kind: tuple[Callable[[Any], bool], str], required: bool = False) -> Any:
        """The value under `key` (None when missing or null), checked against `kind`."""
        self.taken.add(key)
        value = self.obj.get(key)
        if value is None and not required:
            return None
        check, expected = kind
        if not check(value):
            raise self.error(key, value, expected)
        return copy.deepcopy(value) if isinstance(value, Mapping | list) else value

    def rest(self) -> dict[str, Any]:
        return {k: copy.deepcopy(v) for k, v in self.obj.items() if k not in self.taken}


def _put(out: dict, key: str, value: Any) -> None:
    """Missing fields stay missing: a card read and written again keeps its keys."""
    if value is not None:
        out[key] = value


@dataclass(frozen=True, kw_only=True)
class Preprocessing:
    """The card's `preprocessing`: what an image must go through before the model (0-255 RGB scale)."""

    image_size: int
    crop: str | None = None
    crop_padding: int | None = CROP_PADDING  # None: the newer 0.875 crop (missing in the card: CROP_PADDING)
    crop_fraction: float | None = None
    interpolation: str | None = None
    input_range: str | None = None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channel_order: str | None = None
    layout: str | None = None
    normalization: str | None = None  # Keras sources: whose normalisation mean/std fold in
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, obj: Any, where: str = "the model card") -> Preprocessing:
        f = _Fields(obj, where, "preprocessing.")
        return cls(
            image_size=f.take("image_size", _SIZE, required=True),
            crop=f.take("crop", _STR),
            crop_padding=f.take("crop_padding", _PADDING) if "crop_padding" in obj else CROP_PADDING,
            crop_fraction=f.take("crop_fraction", _NUMBER),
            interpolation=f.take("interpolation", _STR),
            input_range=f.take("input_range", _STR),
            mean=tuple(f.take("mean", _MEAN, required=True)),
            std=tuple(f.take("std", _STD, required=True)),
            channel_order=f.take("channel_order", _STR),
            layout=f.take("layout", _STR),
            normalization=f.take("normalization", _STR),
            extra=f.rest(),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"image_size": self.image_size}
        _put(out, "crop", self.crop)
        out["crop_padding"] = self.crop_padding
        _put(out, "crop_fraction", self.crop_fraction)
        _put(out, "interpolation", self.interpolation)
        _put(out, "input_range", self.input_range)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        _put(out, "channel_order", self.channel_order)
        _put(out, "layout", self.layout)
        _put(out, "normalization", self.normalization)
        return out | copy.deepcopy(self.extra)


@dataclass(frozen=True, eq=False, kw_only=True)
class ModelCard(Mapping):
    """A model card, checked. Free-form sections (`source`, `skipped`, ...) are kept as the JSON has them."""

    format: str | None = None  # "effconv-model-card/1"
    effconv_version: str | None = None
    arch: str
    family: str | None = None  # the arch's model family (cards before 0.2 have none: the arch tells)
    variant: str | None = None
    variant_source: str | None = None
    num_classes: int
    image_size: int | None = None
    preprocessing: Preprocessing | None = None
    weights: str | None = None  # the copy used: ema, raw, mixed, as stored
    weights_policy: str | None = None
    mixed_variables: tuple[str, ...] | None = None
    layout: str = "native"  # what a card without one holds
    dtype: str | None = None
    bn_eps: float | None = None
    padding: str | None = None
    parameters: int | None = None
    source: dict[str, Any] | None = None  # path, format, prefix, global_step, sha256, ... as the source gave them
    mapped: int | None = None
    skipped: dict[str, str] | None = None  # source variable -> why it was not used
    nonfinite: dict[str, int] | None = None  # source variable -> NaN/Inf values kept (convert --allow-nonfinite)
    input_normalization: dict[str, Any] | None = None  # Keras: the graph's steps folded into preprocessing
    layout_section: dict[str, Any] | None = None  # under the key `layout`: what timm or mmpretrain needs
    catalogue_name: str | None = None  # a model converted from the catalogue by get_model
    file_format: str | None = None  # torch or safetensors, as the writer recorded
    extra: dict[str, Any] = field(default_factory=dict)  # keys this effconv does not know, kept
    where: str = field(default="the model card", compare=False, repr=False)  # names the card in errors

    @classmethod
    def from_json(cls, obj: Any, where: str = "the model card") -> ModelCard:
        """The card in `obj` (parsed JSON, or the dict a conversion builds), checked; `where` names it in errors."""
        f = _Fields(obj, where)
        arch = f.take("arch", (_STR[0], f"one of {', '.join(spec.ARCH_NAMES)}"), required=True)
        try:
            spec.get_arch(arch)
        except UsageError as e:
            raise UsageError(f"{where}: {e}") from None
        family = f.take("family", _STR)
        if family is not None and family != spec.get_arch(arch).family:
            raise UsageError(f"{where}: family {family!r} does not hold arch {arch!r}")
        num_classes = f.take("num_classes", _COUNT, required=True)
        layout = f.take("layout", _STR)
        layout = "native" if layout is None else layout
        section = layout if layout not in _KEYS else None
        preprocessing = f.take("preprocessing", _OBJECT)
        mixed = f.take("mixed_variables", _STRINGS)
        return cls(
            format=f.take("format", _STR),
            effconv_version=f.take("effconv_version", _STR),
            arch=arch,
            family=family,
            variant=f.take("variant", _STR),
            variant_source=f.take("variant_source", _STR),
            num_classes=num_classes,
            image_size=f.take("image_size", _SIZE),
            preprocessing=None if preprocessing is None else Preprocessing.from_json(preprocessing, where),
            weights=f.take("weights", _STR),
            weights_policy=f.take("weights_policy", _STR),
            mixed_variables=None if mixed is None else tuple(mixed),
            layout=layout,
            dtype=f.take("dtype", _STR),
            bn_eps=f.take("bn_eps", _NUMBER),
            padding=f.take("padding", _STR),
            parameters=f.take("parameters", _COUNT),
            source=f.take("source", _OBJECT),
            mapped=f.take("mapped", _COUNT),
            skipped=f.take("skipped", _OBJECT),
            nonfinite=f.take("nonfinite", _COUNTS),
            input_normalization=f.take("input_normalization", _OBJECT),
            layout_section=f.take(section, _OBJECT) if section else None,
            catalogue_name=f.take("catalogue_name", _STR),
            file_format=f.take("file_format", _STR),
            extra=f.rest(),
            where=where,
        )

    def to_json(self) -> dict[str, Any]:
        """The JSON object, keys in the order effconv writes them (unknown keys last)."""
        return copy.deepcopy(self._json)

    @cached_property
    def _json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        _put(out, "format", self.format)
        _put(out, "effconv_version", self.effconv_version)
        out["arch"] = self.arch
        _put(out, "family", self.family)
        _put(out, "variant", self.variant)
        _put(out, "variant_source", self.variant_source)
        out["num_classes"] = self.num_classes
        _put(out, "image_size", self.image_size)
        _put(out, "preprocessing", None if self.preprocessing is None else self.preprocessing.to_json())
        _put(out, "weights", self.weights)
        _put(out, "weights_policy", self.weights_policy)
        _put(out, "mixed_variables", None if self.mixed_variables is None else list(self.mixed_variables))
        out["layout"] = self.layout
        in_order = ("dtype", "bn_eps", "padding", "parameters", "source", "mapped", "skipped", "nonfinite")
        for key in (*in_order, "input_normalization"):
            _put(out, key, copy.deepcopy(getattr(self, key)))
        _put(out, self.layout, copy.deepcopy(self.layout_section))
        _put(out, "catalogue_name", self.catalogue_name)
        _put(out, "file_format", self.file_format)
        return out | copy.deepcopy(self.extra)

    # Read like the JSON object (what `model.card` was before the type): a copy of each value.
    def __getitem__(self, key: str) -> Any:
        return copy.deepcopy(self._json[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._json)

    def __len__(self) -> int:
        return len(self._json)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ModelCard):
            return self._json == other._json
        return self._json == other if isinstance(other, dict) else NotImplemented

    __hash__ = None  # a card holds dicts, like the JSON it reads as

    def input_size(self) -> int:
        """The side the model was converted for: the card's `image_size`, else the arch's native one."""
        return self.image_size or spec.get_arch(self.arch).resolution

    def needs_preprocessing(self, why: str) -> Preprocessing:
        """The card's preprocessing; a card without one (hand-written, say) is refused here, saying `why`."""
        if self.preprocessing is None:
            raise UsageError(f"{self.where} has no 'preprocessing' section: {why}")
        return self.preprocessing

    @property
    def source_sha256(self) -> dict[str, str] | None:
        """The sha256 of each source file, by name, as the conversion recorded them (None: not recorded)."""
        recorded = (self.source or {}).get("sha256")
        return recorded if isinstance(recorded, dict) else None


# The card's own keys; the key named by `layout`, when not one of these, holds the layout section.
_KEYS = frozenset(f.name for f in fields(ModelCard)) - {"layout_section", "extra", "where"}
