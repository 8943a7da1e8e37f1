"""ONNX export of a converted model, its TF 'SAME' padding fixed for one input size, checked with onnxruntime.

ONNX has no 'SAME' padding that matches TF's for every size (`auto_pad=SAME_UPPER`
is evaluated by each runtime in its own way, and a graph that computes pads from
the input shape is slow and often refused by converters). So the model's padding
is worked out once for the given size (`EfficientNet.set_input_size`) and goes
into every `Conv` as constant, possibly asymmetric, `pads`. Height and width are
fixed; the batch dimension stays free.

The file carries the model card as ONNX metadata (`metadata_props`): the whole card as JSON under
`effconv.card`, and what a runtime needs to feed the graph under plain keys (`mean`, `std`, `image_size`,
`crop_padding`, `num_classes`, `class_names`, ...), see `card_metadata`.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from effconv.errors import OutputError, ParityError, UsageError, one_line
from effconv.output.writing import writing

Say = Callable[[str], None]
DEFAULT_ATOL = 1e-4
# onnxruntime and PyTorch sum in different orders: float32 rounding that grows with the logits' scale
# (EfficientNetV2-b0's fixture weights: 1.7e-4 at logits up to 33). The limit is atol + RTOL * max|logit|.
RTOL = 1e-5
CHECK_BATCHES = (2, 1)  # two batch sizes: the free batch dimension is exercised too
ONNX_SUFFIX = ".onnx"


@dataclass
class OnnxExport:
    """What was written and how closely onnxruntime reproduces PyTorch."""

    path: Path
    arch: str
    input_size: int
    output_name: str
    files: list[Path]
    max_abs_diff: float | None  # None when the check was skipped
    limit: float | None = None  # what it was held to: atol + RTOL x max|output|


def _check_target(onnx_path: str | os.PathLike, force: bool) -> Path:
    path = Path(onnx_path)
    if path.suffix != ONNX_SUFFIX:
        raise UsageError(f"--onnx must end in {ONNX_SUFFIX}: {path}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"output directory does not exist: {parent}")
    if path.is_dir():
        raise UsageError(f"output path is a directory: {path}")
    if path.exists() and not force:
        raise UsageError(f"output exists: {path} (use --force to overwrite)")
    return path


def _onnx_modules():
    try:
        import onnxruntime
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError as e:
        raise UsageError(f"ONNX export needs onnxscript and onnxruntime ({e}); pip install 'effconv[onnx]'") from e
    return onnxruntime


def export_onnx(
    weights: str | os.PathLike,
    onnx_path: str | os.PathLike,
    input_size: int | None = None,
    *,
    force: bool = False,
    check: bool = True,
    atol: float = DEFAULT_ATOL,
    opset: int | None = None,
    say: Say | None = None,
) -> OnnxExport:
    """Export the model `effconv convert` wrote to `weights` (card beside it) as ONNX.

    `input_size` (default: the card's image size) fixes height and width; the
    batch stays dynamic. With `check`, onnxruntime runs the file on seeded N(0, 1)
    batches and its output must match PyTorch's within `atol` (max abs), else
    ParityError (nothing is left at `onnx_path`). `say` hears each step as it starts (torch's exporter alone
    takes ~30 s on b0).
    """
    from effconv.output.loading import load

    target = _check_target(onnx_path, force)
    (say or _silent)(f"loading {weights}")
    model = load(weights)
    size = int(input_size or model.card.input_size())
    return export_model(model, target, size, check=check, atol=atol, opset=opset, say=say)


def _silent(_message: str) -> None:
    pass


def card_metadata(model: torch.nn.Module, input_size: int, output_name: str) -> dict[str, str]:
    """The ONNX metadata: how to feed the graph and read its output, from the model card (when it has one)."""
    from effconv.zoo.inference import class_names

    card = getattr(model, "card", None)
    meta = {
        "arch": model.arch,
        "image_size": str(input_size),
        "input": "input: float32 [batch, 3, image_size, image_size], RGB, normalised as (x - mean) / std",
        "output": output_name,
        "num_classes": str(model.num_classes),
    }
    if model.num_classes:
        meta["class_names"] = json.dumps(class_names(model.num_classes))
    pre = None if card is None else card.get("preprocessing")
    if pre:
        meta |= {"mean": json.dumps(pre["mean"]), "std": json.dumps(pre["std"])}
        meta |= {k: str(pre[k]) for k in ("crop_padding", "interpolation") if pre.get(k) is not None}
    if card is not None:
        meta |= {k: str(card[k]) for k in ("variant", "weights", "effconv_version") if card.get(k) is not None}
        meta["effconv.card"] = json.dumps(dict(card))
    return meta


def export_model(
    model: torch.nn.Module,
    onnx_path: str | os.PathLike,
    input_size: int,
    *,
    check: bool = True,
    atol: float = DEFAULT_ATOL,
    opset: int | None = None,
    say: Say | None = None,
) -> OnnxExport:
    """`export_onnx` for an EfficientNet already in memory (its padding is fixed for `input_size`)."""
    say = say or _silent
    ort = _onnx_modules()
    target = Path(onnx_path)
    if input_size < 1:
        raise UsageError(f"--input-size must be positive, not {input_size}")
    from effconv.models.blocks import ExpertConv

    if any(isinstance(m, ExpertConv) for m in model.modules()):
        raise UsageError(
            f"{model.arch}: CondConv models do not export to ONNX (each example gets its own kernels, a "
            "convolution with as many groups as the batch has examples, which ONNX cannot express for a free batch)"
        )
    model.eval().set_input_size(input_size)
    output_name = "logits" if model.num_classes else "features"
    example = torch.randn(CHECK_BATCHES[0], 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
    say(f"exporting efficientnet-{model.arch} at {input_size} px with torch.export (the longest step)")
    program = _export(model, example, output_name, opset)
    program.model.metadata_props.update(card_metadata(model, input_size, output_name))

    # Written in a temporary folder beside the target, then moved into place: never half a file under
    # the target's name. Over 2 GB (l2) the tensors go to an external data file next to it.
    parent = target.parent if str(target.parent) else Path(".")
    with writing(target):
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=parent))
    try:
        say(f"writing {target}")
        with writing(target):
            program.save(staging / target.name)
        if check:
            say("checking with onnxruntime against PyTorch")
        diff, scale = (
            _check_with_onnxruntime(ort, model, staging / target.name, input_size, output_name)
            if check
            else (None, 0.0)
        )
        limit = atol + RTOL * scale
        if diff is not None and not diff <= limit:
            raise ParityError(
                f"onnxruntime differs from PyTorch by {diff:.3g} (max abs) > {limit:.3g} "
                f"({atol:g} + {RTOL:g} x max|{output_name}| {scale:.3g}); nothing written"
            )
        files = []
        with writing(target):
            for f in sorted(staging.iterdir(), key=lambda f: f.name != target.name):
                os.replace(f, parent / f.name)
                files.append(parent / f.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return OnnxExport(target, model.arch, input_size, output_name, files, diff, limit if check else None)


def _export(model: torch.nn.Module, example: torch.Tensor, output_name: str, opset: int | None):
    batch = torch.export.Dim("batch", min=1, max=4096)
    quiet = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), _quiet_logger("torch.onnx"):
        warnings.simplefilter("ignore")
        try:
            return torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                input_names=["input"],
                output_names=[output_name],
                dynamic_shapes={"x": {0: batch}},
                opset_version=opset,
            )
        except torch.onnx.OnnxExporterError as e:  # TorchExportError, ConversionError: what failed, with its log
            log = one_line("\n".join(quiet.getvalue().splitlines()[-3:]))
            raise OutputError(f"ONNX export failed: {one_line(e, max_lines=1)}" + (f" ({log})" if log else "")) from e


@contextlib.contextmanager
def _quiet_logger(name: str):
    """The exporter logs its progress and optional registrations; effconv prints its own summary."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _check_with_onnxruntime(
    ort, model: torch.nn.Module, path: Path, size: int, output_name: str
) -> tuple[float, float]:
    """Max abs difference between onnxruntime and PyTorch on seeded batches of each CHECK_BATCHES size, and the
    largest |output| PyTorch gave (the scale of the rounding)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    worst = scale = 0.0
    for seed, batch in enumerate(CHECK_BATCHES, start=1):
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
        with torch.inference_mode():
            expected = model(x).numpy()
        (got,) = session.run([output_name], {"input": x.numpy()})
        worst = max(worst, float(np.abs(got.astype(np.float64) - expected).max()))
        scale = max(scale, float(np.abs(expected).max()))
    return worst, scale
