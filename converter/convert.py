"""Source checkpoint -> state dict in the chosen layout and dtype, plus model card, without TensorFlow.

One flow for every source and layout: the source's format (`effconv.formats`)
opens a lazy reader and plans the mapping of its names to canonical (native)
names; each tensor is read, transposed, cast to the dtype and handed on under the
layout table's name.
"""

from __future__ import annotations

import os
import time
import warnings as _warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from effconv import __version__
from effconv.card import ModelCard
from effconv.ema_policy import EmaChoice
from effconv.errors import CheckpointError, MappingError, UsageError
from effconv.formats import Detected, open_source
from effconv.mappings import engine, transforms
from effconv.mappings.layouts import CARD_SECTIONS, LAYOUT_CHECKS, get_layout
from effconv.mappings.official import EMA_SUFFIX
from effconv.models import spec
from effconv.models.efficientnet import model_tensor_shapes
from effconv.output.dtypes import WEIGHT_DTYPES
from effconv.variants import detect_image_size, detect_variant, get_variant, preprocessing

CARD_FORMAT = "effconv-model-card/1"
ProgressFn = Callable[[int, int], None]  # (bytes done, bytes total)
Sink = Callable[[str, torch.Tensor], None]  # (name, tensor valid during the call only)
DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in WEIGHT_DTYPES}
# Batch-norm running statistics stay float32 in every dtype: a variance of 1e-5 is 0 in float16.
FLOAT32_SUFFIXES = (".running_mean", ".running_var")


@dataclass
class Conversion:
    """The converted tensors (empty when they went to a sink), the model card and the figures of the run."""

    state_dict: dict[str, torch.Tensor]
    card: ModelCard
    detected: Detected  # what the source holds
    choice: EmaChoice
    order: list[str]  # the state dict's names, in the model's order
    skipped: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def parameters(self) -> int:
        return int(self.card["parameters"])


def _check_float_weights(infos, origin: Path) -> None:
    """Refuse integer, bool or complex weights before reading: they would land as is in a float artifact."""
    for info in infos:
        if info.dtype.kind != "f" and not info.unsupported:  # unsupported ones: the reader says why
            raise MappingError(
                f"{info.name!r} in {origin} has dtype {info.dtype_name or info.dtype}; "
                "model weights must be float16, float32 or float64"
            )


def _nonfinite_count(array: np.ndarray) -> int:
    """How many NaN or +-Inf values `array` holds: one summing pass, counted exactly only when the sum is not finite.

    NaN and Inf make the sum non-finite; so can finite values that overflow it (float16 weights): the exact
    count then decides.
    """
    if array.dtype.kind != "f" or not array.size:
        return 0
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(np.add.reduce(array.reshape(-1))):
            return 0
    return int(array.size - np.count_nonzero(np.isfinite(array)))


def _check_finite(name: str, array: np.ndarray, allow: bool, kept: dict[str, int], origin: Path) -> None:
    """Refuse a weight holding NaN or Inf; with `allow`, note how many it holds in `kept` instead."""
    count = _nonfinite_count(array)
    if count and not allow:
        raise CheckpointError(
            f"tensor {name!r} in {origin} holds {count} non-finite values (NaN or Inf) of {array.size}: "
            "the model would output NaN; convert with --allow-nonfinite to keep them"
        )
    if count:
        kept[name] = count


def _checksum_only(reader, keys: list[str], used: set[str]) -> list:
    """The infos of the tensors the conversion does not use, to be read for their checksum alone.

    A flipped byte in a tensor nobody reads would otherwise pass unseen. Only for readers whose `read`
    checks a stored checksum (`checksummed`: TF bundles' crc32c), and only tensors they can read.
    """
    if not getattr(reader, "checksummed", False):
        return []
    return [info for k in keys if k not in used and not (info := reader.info(k)).unsupported]


def _skip_reasons(keys: list[str], used: set[str], choice: EmaChoice, table) -> dict[str, str]:
    unused = [k for k in keys if k not in used]
    reasons = engine.classify_unused(unused, table)
    for k in unused:
        if reasons[k] != "unknown variable":
            continue
        base = k.removesuffix(EMA_SUFFIX)
        if base in choice.source_of:
            reasons[k] = "EMA copy (raw weights used)" if k.endswith(EMA_SUFFIX) else "raw copy (EMA weights used)"
    return reasons


def _resolve_variant(variant: str | None, origin: Path, warnings: list[str], keras_norm) -> tuple[str, str]:
    if variant is not None:
        return get_variant(variant).name, "given"
    if keras_norm is not None:
        folded = [*keras_norm[0], *keras_norm[1]]
        for name in ("standard", "advprop"):
            v = get_variant(name)
            if all(abs(a - b) <= 1e-3 for a, b in zip(folded, [*v.mean, *v.std], strict=True)):
                return name, "the Keras graph's input normalisation"
        return "standard", "label only: the Keras graph's own normalisation is in preprocessing"
    found = detect_variant(origin.resolve())
    if found:
        return found, "detected from the source path"
    warnings.append(
        "variant not given and not evident from the source path: assuming 'standard' (the family's usual "
        "input normalisation, in the card). AdvProp checkpoints need --variant advprop ([-1, 1] input); wrong "
        "preprocessing is the commonest cause of lost accuracy"
    )
    return "standard", "default"


class _Scratch:
    """Two reused buffers: one the source tensor is read into, one it is transposed into.

    Fresh memory for every tensor costs a page fault per 4 kB (the first touch of each page);
    reused buffers cost that once.
    """

    def __init__(self, nbytes: int):
        self.raw = np.empty(nbytes, dtype=np.uint8)
        self.moved = np.empty(nbytes, dtype=np.uint8)

    def read(self, reader, key: str) -> np.ndarray:
        return reader.read(key, out=self.raw)

    def transform(self, transform: str, array: np.ndarray) -> np.ndarray:
        if transforms.is_copy(transform):
            return array
        out = self.moved[: array.nbytes].view(array.dtype).reshape(transforms.target_shape(transform, array.shape))
        return transforms.apply(transform, array, out=out)


class _Pipeline:
    """Read and transpose on the calling thread while one worker thread hands tensors to the sink.

    Writing (CRC-32 and the copy into the page cache) takes about as long as reading,
    checking and transposing; the two overlap. Each tensor lives in one of a few
    `_Scratch` slots, taken again only after the sink has returned for it. The sink
    sees tensors in the order submitted; its first error is raised here.
    """

    SLOTS = 3

    def __init__(self, sink: Sink, nbytes: int):
        self._sink = sink
        self._slots = [_Scratch(nbytes) for _ in range(self.SLOTS)]
        self._pending: list[Future | None] = [None] * self.SLOTS
        self._next = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="effconv-write")

    def free_slot(self) -> _Scratch:
        """The next slot, once the sink is done with what it last held."""
        k = self._next
        if self._pending[k] is not None:
            self._pending[k].result()
            self._pending[k] = None
        return self._slots[k]

    def submit(self, name: str, tensor: torch.Tensor) -> None:
        """Hand `tensor` (in the slot `free_slot` gave) to the sink."""
        self._pending[self._next] = self._pool.submit(self._sink, name, tensor)
        self._next = (self._next + 1) % self.SLOTS

    def __enter__(self) -> _Pipeline:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        try:
            if exc_type is None:  # wait for every write, in order, and raise the first failure
                for k in range(self.SLOTS):
                    future = self._pending[(self._next + k) % self.SLOTS]
                    if future is not None:
                        future.result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)


def convert_checkpoint(
    src: str | os.PathLike,
    *,
    arch: str | None = None,
    ema: str = "auto",
    allow_mixed: bool = False,
    variant: str | None = None,
    image_size: int | None = None,
    layout: str = "native",
    dtype: str = "float32",
    progress: ProgressFn | None = None,
    sink: Sink | None = None,
    weights: str | None = None,
    allow_nonfinite: bool = False,
) -> Conversion:
    """Read the checkpoint at `src` (TF dir, prefix, .index, tarball, or Keras .h5) into a state dict.

    `ema`: "auto" takes the EMA copies when the checkpoint has them (as the official evaluator),
    raw otherwise; "ema" or "raw" forces one (`weights=` is the deprecated name of `ema=`).
    The state dict has `layout`'s names (native: effconv's own model) and `dtype`. With a
    `sink`, each tensor goes to `sink(name, tensor)` as soon as it is converted, in the source's
    file order, and `Conversion.state_dict` stays empty: the tensor's memory is reused after the
    call returns, so the sink writes or copies it (`ArtifactWriter.add` does). `Conversion.order`
    gives the model's order of the names.

    Every tensor of a checksummed source (a TF bundle: crc32c) is checked, the unused ones too, in the same
    pass; the card's `source.crc32c_checked` counts them. A weight holding NaN or Inf is refused, naming it,
    unless `allow_nonfinite`: then it is kept and listed in the card's `nonfinite`.
    """
    from effconv.output.hashing import hash_in_background

    if weights is not None:  # the name before 0.2; in every other command --weights means a file
        _warnings.warn("convert_checkpoint(weights=...) is deprecated: use ema=", DeprecationWarning, stacklevel=2)
        ema = weights
    start = time.perf_counter()
    warnings: list[str] = []
    table = get_layout(layout)
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    with open_source(src) as source:
        reader = source.reader
        hashes = hash_in_background(source.files)
        keys = reader.keys()
        shapes = {k: reader.info(k).shape for k in keys}
        planned = source.format.plan(source, shapes, arch, ema, allow_mixed)
        found, plan, choice = planned.detected, planned.plan, planned.choice
        family = spec.family_of(found.arch)
        size = image_size or detect_image_size(found.arch, source.origin)
        if table.name in LAYOUT_CHECKS:  # before any tensor is read
            LAYOUT_CHECKS[table.name](found.arch, size)
        target_shapes, n_params = model_tensor_shapes(found.arch, found.num_classes)
        counters = {k for k in target_shapes if k.endswith("num_batches_tracked")}
        engine.check_plan(
            plan,
            {m.source: shapes[choice.source_of[m.source]] for m in plan if choice.source_of[m.source] in shapes},
            {k: v for k, v in target_shapes.items() if k not in counters},
        )
        names = engine.layout_names(table, found.arch, found.num_classes)
        order = [names[k] for k in target_shapes]
        # Read in file order: one sequential pass over each shard.
        infos = {m.target: reader.info(choice.source_of[m.source]) for m in plan}
        _check_float_weights(infos.values(), source.origin)
        used = {choice.source_of[m.source] for m in plan}
        steps = [(infos[m.target], m) for m in plan] + [(info, None) for info in _checksum_only(reader, keys, used)]
        steps.sort(key=lambda step: (step[0].shard, step[0].offset))
        nonfinite: dict[str, int] = {}
        state: dict[str, torch.Tensor] = {}
        if sink is None:
            sink = lambda name, tensor: state.__setitem__(name, tensor.clone())  # noqa: E731
        target_dtype = DTYPES[dtype]
        total, done = sum(info.nbytes for info, _ in steps), 0
        with _Pipeline(sink, max((info.nbytes for info, _ in steps), default=0)) as pipeline:
            for info, m in steps:
                slot = pipeline.free_slot()
                array = slot.read(reader, info.name)  # checksum-checked
                done += array.nbytes
                if m is not None:  # else read for its checksum only: the slot stays free
                    _check_finite(info.name, array, allow_nonfinite, nonfinite, source.origin)
                    tensor = torch.from_numpy(slot.transform(m.transform, array))
                    if tensor.is_floating_point() and not m.target.endswith(FLOAT32_SUFFIXES):
                        tensor = tensor.to(target_dtype)
                    pipeline.submit(names[m.target], tensor)
                if progress:
                    progress(done, total)
        for k in counters:
            sink(names[k], torch.zeros((), dtype=torch.long))
        if state:
            state = {name: state[name] for name in order}
        skipped = _skip_reasons(keys, used, choice, planned.table)
        var_name, var_source = _resolve_variant(variant, source.origin, warnings, planned.mean_std)
        pre = preprocessing(var_name, size, found.arch)
        if planned.mean_std is not None:
            pre |= {"mean": planned.mean_std[0], "std": planned.mean_std[1], "normalization": "the Keras graph's"}
        card = {
            "format": CARD_FORMAT,
            "effconv_version": __version__,
            "arch": found.arch,
            "family": found.family,
            "variant": var_name,
            "variant_source": var_source,
            "num_classes": found.num_classes,
            "image_size": size,
            "preprocessing": pre,
            "weights": planned.card["weights"],
            "weights_policy": planned.card["weights_policy"],
            "mixed_variables": planned.card["mixed_variables"],
            "layout": table.name,
            "dtype": dtype,
            "bn_eps": family.bn_eps,
            "padding": family.padding,
            "parameters": n_params,
            "source": {
                "path": str(source.origin),
                "format": source.format.name,
                **planned.card["source"],
                "variables": len(keys),
                "sha256": hashes.result(),
                "crc32c_checked": len(steps) if getattr(reader, "checksummed", False) else 0,  # every tensor read
            },
            "mapped": len(plan),
            "skipped": skipped,
        }
        if nonfinite:
            card["nonfinite"] = dict(sorted(nonfinite.items()))
            warnings.append(
                f"{len(nonfinite)} tensors hold NaN or Inf values, kept (--allow-nonfinite): "
                + ", ".join(list(card["nonfinite"])[:3])
                + (", ..." if len(nonfinite) > 3 else "")
            )
        if "input_normalization" in planned.card:
            card["input_normalization"] = planned.card["input_normalization"]
        if table.name in CARD_SECTIONS:
            card[table.name] = CARD_SECTIONS[table.name](card)
        card = ModelCard.from_json(card, "the card of this conversion")
    if choice.used == "mixed":
        warnings.append(f"{len(choice.mixed)} variables use the other copy than asked (--allow-mixed)")
    return Conversion(state, card, found, choice, order, skipped, warnings, time.perf_counter() - start)
