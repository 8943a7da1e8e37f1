"""Official TF checkpoint -> native PyTorch state dict plus model card, without TensorFlow."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from effconv import __version__
from effconv.bundle import TensorBundleReader
from effconv.detect import CheckpointLayout, detect_layout
from effconv.ema_policy import EmaChoice, choose_weights
from effconv.mappings import engine, transforms
from effconv.mappings.official import EMA_SUFFIX
from effconv.models import spec
from effconv.models.efficientnet import model_tensor_shapes
from effconv.source import resolve_checkpoint
from effconv.variants import detect_image_size, detect_variant, get_variant, preprocessing

CARD_FORMAT = "effconv-model-card/1"
ProgressFn = Callable[[int, int], None]  # (bytes done, bytes total)


@dataclass
class Conversion:
    """The converted tensors, the model card and the figures of the run."""

    state_dict: dict[str, torch.Tensor]
    card: dict
    layout: CheckpointLayout
    choice: EmaChoice
    skipped: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def parameters(self) -> int:
        return int(self.card["parameters"])


def _resolve_variant(variant: str | None, origin: Path, warnings: list[str]) -> tuple[str, str]:
    if variant is not None:
        return get_variant(variant).name, "given"
    found = detect_variant(origin.resolve())
    if found:
        return found, "detected from the source path"
    warnings.append(
        "variant not given and not evident from the source path: assuming 'standard' (ImageNet mean/std "
        "input). AdvProp checkpoints need --variant advprop ([-1, 1] input); wrong preprocessing is the "
        "commonest cause of lost accuracy"
    )
    return "standard", "default"


def _skip_reasons(keys: list[str], used: set[str], choice: EmaChoice) -> dict[str, str]:
    unused = [k for k in keys if k not in used]
    reasons = engine.classify_unused(unused)
    for k in unused:
        if reasons[k] != "unknown variable":
            continue
        base = k.removesuffix(EMA_SUFFIX)
        if base in choice.source_of:
            reasons[k] = "EMA copy (raw weights used)" if k.endswith(EMA_SUFFIX) else "raw copy (EMA weights used)"
    return reasons


def convert_checkpoint(
    src: str | os.PathLike,
    *,
    arch: str | None = None,
    weights: str = "auto",
    allow_mixed: bool = False,
    variant: str | None = None,
    image_size: int | None = None,
    progress: ProgressFn | None = None,
) -> Conversion:
    """Read the checkpoint at `src` (dir, prefix, .index or tarball) into a native state dict."""
    from effconv.hashing import hash_in_background

    start = time.perf_counter()
    warnings: list[str] = []
    with resolve_checkpoint(src) as files, TensorBundleReader(files.prefix) as reader:
        hashes = hash_in_background(files.files)
        keys = reader.keys()
        shapes = {k: reader.info(k).shape for k in keys}
        layout = detect_layout(shapes, arch)
        plan = engine.official_plan(layout.arch, layout.num_classes, layout.prefix, layout.bn)
        choice = choose_weights([m.source for m in plan], shapes, weights, allow_mixed)
        target_shapes, n_params = model_tensor_shapes(layout.arch, layout.num_classes)
        counters = {k for k in target_shapes if k.endswith("num_batches_tracked")}
        engine.check_plan(
            plan,
            {m.source: shapes[choice.source_of[m.source]] for m in plan if choice.source_of[m.source] in shapes},
            {k: v for k, v in target_shapes.items() if k not in counters},
        )
        # Read in file order: one sequential pass over each shard.
        infos = {m.target: reader.info(choice.source_of[m.source]) for m in plan}
        ordered = sorted(plan, key=lambda m: (infos[m.target].shard, infos[m.target].offset))
        total = sum(info.nbytes for info in infos.values())
        done = 0
        state: dict[str, torch.Tensor] = {}
        for m in ordered:
            key = choice.source_of[m.source]
            array = reader.read(key)
            state[m.target] = torch.from_numpy(transforms.apply(m.transform, array))
            done += array.nbytes
            if progress:
                progress(done, total)
        for k in counters:
            state[k] = torch.zeros((), dtype=torch.long)
        state = {k: state[k] for k in target_shapes}  # the model's own order
        global_step = int(reader.read("global_step")) if "global_step" in shapes else None
        used = {choice.source_of[m.source] for m in plan}
        skipped = _skip_reasons(keys, used, choice)
        var_name, var_source = _resolve_variant(variant, files.origin, warnings)
        size = image_size or detect_image_size(layout.arch, files.origin)
        card = {
            "format": CARD_FORMAT,
            "effconv_version": __version__,
            "arch": layout.arch,
            "variant": var_name,
            "variant_source": var_source,
            "num_classes": layout.num_classes,
            "image_size": size,
            "preprocessing": preprocessing(var_name, size),
            "weights": choice.used,
            "weights_policy": weights,
            "mixed_variables": list(choice.mixed),
            "layout": "native",
            "dtype": "float32",
            "bn_eps": spec.BN_EPS,
            "padding": "tf-same",
            "parameters": n_params,
            "source": {
                "path": str(files.origin),
                "prefix": layout.prefix,
                "bn_scope": layout.bn,
                "global_step": global_step,
                "variables": len(keys),
                "sha256": hashes.result(),
            },
            "mapped": len(plan),
            "skipped": skipped,
        }
    if choice.used == "mixed":
        warnings.append(f"{len(choice.mixed)} variables use the other copy than asked (--allow-mixed)")
    return Conversion(state, card, layout, choice, skipped, warnings, time.perf_counter() - start)
