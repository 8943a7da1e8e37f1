"""`effconv inspect`: what a checkpoint (or Keras .h5) holds, without reading its tensors."""

from __future__ import annotations

import os
from collections import Counter

from effconv.errors import EffconvError
from effconv.formats.bundle import TensorBundleReader
from effconv.formats.checkpoint_files import resolve_checkpoint
from effconv.formats.keras_h5 import is_keras_source
from effconv.formats.tf_checkpoint import detect_layout
from effconv.mappings import engine, keras
from effconv.mappings.official import EMA_SUFFIX


def inspect_checkpoint(src: str | os.PathLike) -> dict:
    """A JSON-ready description of the checkpoint at `src`."""
    if is_keras_source(src):
        return inspect_keras(src)
    with resolve_checkpoint(src) as files, TensorBundleReader(files.prefix) as reader:
        keys = reader.keys()
        infos = {k: reader.info(k) for k in keys}
        report: dict = {
            "source": str(files.origin),
            "format": "tf-checkpoint",
            "prefix_path": str(files.prefix),
            "files": {p.name: p.stat().st_size for p in files.files},
            "variables": len(keys),
            "bytes": sum(i.nbytes for i in infos.values()),
            "dtypes": dict(Counter(str(i.dtype) for i in infos.values())),
        }
        try:
            layout = detect_layout({k: i.shape for k, i in infos.items()})
        except EffconvError as e:
            report.update(arch=None, problem=str(e))
            return report
        plan = engine.official_plan(layout.arch, layout.num_classes, layout.prefix, layout.bn)
        needed = {m.source for m in plan}
        ema = sum(1 for n in needed if n + EMA_SUFFIX in infos)
        raw = sum(1 for n in needed if n in infos)
        model_keys = needed | {n + EMA_SUFFIX for n in needed}
        other = engine.classify_unused([k for k in keys if k not in model_keys])
        report.update(
            arch=layout.arch,
            prefix=layout.prefix,
            bn_scope=layout.bn,
            num_classes=layout.num_classes,
            blocks=layout.num_blocks,
            model_variables=len(needed),
            ema_copies=ema,
            raw_copies=raw,
            ema="complete" if ema == len(needed) else ("none" if ema == 0 else "partial"),
            missing=sorted(n for n in needed if n not in infos and n + EMA_SUFFIX not in infos),
            optimizer_slots=sum(1 for r in other.values() if r == "optimizer slot"),
            unknown_variables=sorted(k for k, r in other.items() if r == "unknown variable"),
            global_step=_global_step(reader, infos),
        )
    return report


def _global_step(reader: TensorBundleReader, infos: dict) -> int | None:
    """The training step when it is a scalar integer; else None (inspect reports, it does not refuse)."""
    info = infos.get("global_step")
    if info is None or info.shape != () or info.dtype.kind not in "iu":
        return None
    return int(reader.read("global_step"))


def inspect_keras(src: str | os.PathLike) -> dict:
    """The Keras .h5 counterpart of `inspect_checkpoint` (reads only the normalisation weights)."""
    from pathlib import Path

    from effconv.formats.keras import detect_keras_layout, keras_input_normalization
    from effconv.formats.keras_h5 import KerasH5Reader

    path = Path(src).expanduser()
    with KerasH5Reader(path) as reader:
        keys = reader.keys()
        infos = {k: reader.info(k) for k in keys}
        report: dict = {
            "source": str(path),
            "format": "keras-h5",
            "saved_as": reader.saved_as,
            "keras_version": reader.keras_version,
            "backend": reader.backend,
            "files": {path.name: path.stat().st_size},
            "variables": len(keys),
            "bytes": sum(i.nbytes for i in infos.values()),
            "dtypes": dict(Counter(str(i.dtype) for i in infos.values())),
        }
        try:
            layout = detect_keras_layout({k: i.shape for k, i in infos.items()})
            norm = keras_input_normalization(reader, layout)
        except EffconvError as e:
            report.update(arch=None, problem=str(e))
            return report
        plan = engine.source_plan(keras.TABLE, layout.arch, layout.num_classes, depthwise=layout.depthwise)
        needed = {m.source for m in plan}
        other = engine.classify_unused([k for k in keys if k not in needed], keras.TABLE)
        report.update(
            arch=layout.arch,
            num_classes=layout.num_classes,
            blocks=layout.num_blocks,
            model_variables=len(needed),
            missing=sorted(n for n in needed if n not in infos),
            unknown_variables=sorted(k for k, r in other.items() if r == "unknown variable"),
            input_normalization={"mean": norm.mean, "std": norm.std, **norm.to_card()},
        )
    return report


def format_report(report: dict) -> str:
    """The human-readable form of `inspect_checkpoint`'s result."""
    mib = report["bytes"] / 2**20
    lines = [
        f"source:      {report['source']}",
        f"variables:   {report['variables']} ({mib:,.1f} MiB of tensor data; dtypes {report['dtypes']})",
    ]
    if report.get("format") == "keras-h5":
        lines.append(f"format:      Keras {report['keras_version']} legacy HDF5 {report['saved_as']} file")
    if report.get("arch") is None:
        lines.append(f"arch:        not recognised: {report.get('problem')}")
        return "\n".join(lines)
    if report.get("format") == "keras-h5":
        norm = report["input_normalization"]
        lines += [
            f"arch:        {report['arch']} ({report['blocks']} blocks)",
            f"classes:     {report['num_classes'] or 'no classifier head'}",
            f"input:       (x - {_rounded(norm['mean'])}) / {_rounded(norm['std'])} on 0-255 RGB, "
            f"folded from {norm['graph']}",
        ]
        if norm.get("note"):
            lines.append(f"note:        {norm['note']}")
    else:
        lines += [
            f"arch:        {report['arch']} (prefix '{report['prefix']}', {report['blocks']} blocks, "
            f"batch norm '{report['bn_scope']}')",
            f"classes:     {report['num_classes'] or 'no classifier head'}",
            f"EMA:         {report['ema']} ({report['ema_copies']} EMA / {report['raw_copies']} raw copies "
            f"of {report['model_variables']} model variables)",
            f"global step: {report['global_step']}",
            f"optimizer:   {report['optimizer_slots']} slot variables (ignored on conversion)",
        ]
    lines.append(
        f"unknown:     {len(report['unknown_variables'])}"
        + (f" e.g. {report['unknown_variables'][:3]}" if report["unknown_variables"] else "")
    )
    if report["missing"]:
        lines.append(f"MISSING:     {len(report['missing'])} model variables, e.g. {report['missing'][:3]}")
    return "\n".join(lines)


def _rounded(values: list[float]) -> list[float]:
    return [round(v, 4) for v in values]
