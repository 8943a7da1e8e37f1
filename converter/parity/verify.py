"""`effconv verify`: TensorFlow and PyTorch on identical inputs, logits and every layer compared.

The TensorFlow side reads the checkpoint with TensorFlow itself and runs our TF
reference model (validated against the official fixture); the PyTorch side is
either an artifact already written (with its model card) or an in-memory
conversion. Nothing is shared between the two sides but the input batch and the
EMA policy.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from effconv import __version__
from effconv.card import ModelCard
from effconv.errors import UsageError
from effconv.parity.arguments import check_weights_fit_source, image_files

DEFAULT_ATOL = 1e-3
# Float32 TF and PyTorch sum in different orders, so their logits part by a few float32 eps per layer times
# the logits' scale: measured up to 2.4e-5 x max|logit| (a synthesised condconv-b0-8e at 97 px, logits up to
# 78, where the absolute 1e-3 alone failed). 1e-4 keeps a margin of 4; a broken block moves logits by
# about max|logit| itself.
DEFAULT_RTOL = 1e-4
# The dtype of the weights checked (the card's `dtype`) sets the default tolerance: (atol, rtol). Weights rounded
# to float16 / bfloat16 move every output by a few of the dtype's epsilon (2**-10, 2**-7) times its scale:
# measured on the official-b0 fixture (its oracle inputs and N(0,1) batches of seeds 0-3, against the float32
# conversion), the logits moved by at most 8.7 eps x max|logit| (float16: 0.087 of 10.2) and 5.6 eps (bfloat16:
# 0.44 of 10.2), any other layer by at most 15.3 eps x max(1, max|layer|). HALF_PRECISION_EPS = 32 eps keeps a
# margin of 3.7 on the logits and 2 on the layers.
HALF_PRECISION_EPS = 32
DTYPE_TOLERANCES: dict[str, tuple[float, float]] = {
    "float32": (DEFAULT_ATOL, DEFAULT_RTOL),
    "float16": (DEFAULT_ATOL, HALF_PRECISION_EPS * 2.0**-10),
    "bfloat16": (DEFAULT_ATOL, HALF_PRECISION_EPS * 2.0**-7),
}
Say = Callable[[str], None]


@dataclass
class LayerDiff:
    """How far PyTorch is from TensorFlow on one tensor."""

    name: str
    shape: list[int]
    max_abs: float
    max_rel: float  # max_abs / max |TF value|
    ref_absmax: float
    tolerance: float
    passed: bool


@dataclass
class CaseResult:
    """One model on one input batch."""

    name: str
    input: str
    batch: int
    input_size: list[int]
    logits: LayerDiff | None
    cosine_min: float | None
    top1_agreement: float | None
    top5_agreement: float | None
    layers: list[LayerDiff] = field(default_factory=list)
    first_divergent: str | None = None
    preprocessing_max_abs: float | None = None  # --images: our preprocessing vs TF's, 0-255 scale
    seconds_tf: float = 0.0
    seconds_torch: float = 0.0

    @property
    def passed(self) -> bool:
        if self.logits is not None:
            return self.logits.passed and self.first_divergent is None
        return self.first_divergent is None


@dataclass
class VerifyReport:
    arch: str
    num_classes: int
    weights: str
    source: str
    source_sha256: dict[str, str]
    artifact: str | None
    atol: float
    rtol: float
    cases: list[CaseResult]
    versions: dict[str, str]
    notes: list[str] = field(default_factory=list)
    dtype: str = "float32"  # of the weights checked, as their card says (an in-memory conversion: float32)
    tolerance_from: str = "the float32 default"  # or "--atol/--rtol given", "the float16 default", ...

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.cases)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["passed"] = self.passed
        for case, obj in zip(out["cases"], self.cases, strict=True):
            case["passed"] = obj.passed
        out["tolerance"] = (
            f"{self.dtype} weights, {self.tolerance_from}: logits: max|torch - tf| <= {self.atol:g} + {self.rtol:g} "
            f"* max|tf|; other layers: max|torch - tf| <= {self.atol + self.rtol:g} * max(1, max|tf layer|)"
        )
        return out


def versions() -> dict[str, str]:
    import tensorflow as tf

    return {
        "effconv": __version__,
        "torch": torch.__version__,
        "tensorflow": tf.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def compare(name: str, ours: np.ndarray, ref: np.ndarray, tolerance: float) -> LayerDiff:
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if ours.shape != ref.shape:
        return LayerDiff(name, list(ref.shape), float("inf"), float("inf"), 0.0, tolerance, False)
    diff = float(np.abs(ours - ref).max()) if ref.size else 0.0
    absmax = float(np.abs(ref).max()) if ref.size else 0.0
    rel = diff / absmax if absmax else diff
    return LayerDiff(name, list(ref.shape), diff, rel, absmax, tolerance, bool(diff <= tolerance))


def _topk_agreement(a: np.ndarray, b: np.ndarray, k: int) -> float:
    k = min(k, a.shape[1])
    ta = np.argsort(-a, axis=1)[:, :k]
    tb = np.argsort(-b, axis=1)[:, :k]
    return float(np.mean([set(x) == set(y) for x, y in zip(ta, tb, strict=True)]))


def _cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)
    return float(cos.min())


def endpoint_order(num_blocks: int, with_logits: bool) -> list[str]:
    names = ["stem"] + [f"block_{i}" for i in range(num_blocks)] + ["head_1x1", "pooled_features"]
    return names + (["logits"] if with_logits else [])


def _nhwc(t: torch.Tensor) -> np.ndarray:
    a = t.detach().numpy()
    return a.transpose(0, 2, 3, 1) if a.ndim == 4 else a


def compare_case(
    name: str,
    input_desc: str,
    x_nhwc: np.ndarray,
    tf_model,
    torch_model,
    *,
    atol: float,
    rtol: float,
    per_layer: bool,
    say: Say,
) -> CaseResult:
    """Run both models on `x_nhwc` and compare; per-layer when asked or when logits fail."""
    x_nchw = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
    has_logits = bool(torch_model.num_classes)
    say(f"{name}: TensorFlow forward on {input_desc}")
    t0 = time.perf_counter()
    tf_out = tf_model(x_nhwc, endpoints=True)
    t1 = time.perf_counter()
    say(f"{name}: PyTorch forward on {input_desc}")
    with torch.inference_mode():
        torch_out = {k: _nhwc(v) for k, v in torch_model.forward_endpoints(x_nchw).items()}
    t2 = time.perf_counter()
    final = "logits" if has_logits else "pooled_features"
    ref, ours = tf_out[final], torch_out[final]
    tol = atol + rtol * float(np.abs(ref).max())
    logits = compare(final, ours, ref, tol)
    case = CaseResult(
        name=name,
        input=input_desc,
        batch=int(x_nhwc.shape[0]),
        input_size=[int(x_nhwc.shape[1]), int(x_nhwc.shape[2])],
        logits=logits,
        cosine_min=_cosine_min(ours, ref),
        top1_agreement=_topk_agreement(ours, ref, 1) if has_logits else None,
        top5_agreement=_topk_agreement(ours, ref, 5) if has_logits else None,
        seconds_tf=t1 - t0,
        seconds_torch=t2 - t1,
    )
    if per_layer or not logits.passed:
        for layer in endpoint_order(len(torch_model.blocks), has_logits):
            ref_layer = tf_out[layer]
            layer_tol = tol if layer == final else (atol + rtol) * max(1.0, float(np.abs(ref_layer).max()))
            diff = compare(layer, torch_out[layer], ref_layer, layer_tol)
            case.layers.append(diff)
            if not diff.passed and case.first_divergent is None:
                case.first_divergent = layer
    return case


def resolve_tolerance(dtype: str | None, atol: float | None, rtol: float | None) -> tuple[float, float, str]:
    """(atol, rtol, where they come from): the dtype's defaults (`DTYPE_TOLERANCES`) unless the user gave either.

    A user who gives --atol or --rtol sets the tolerance: the one not given is then the float32 default.
    """
    dtype = dtype if dtype in DTYPE_TOLERANCES else "float32"
    if atol is None and rtol is None:
        return (*DTYPE_TOLERANCES[dtype], f"the {dtype} default")
    atol = DEFAULT_ATOL if atol is None else atol
    return atol, DEFAULT_RTOL if rtol is None else rtol, "--atol/--rtol given"


def random_batch(batch: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3), dtype=np.float32)


def _torch_side(src, artifact: str | None, policy: str, allow_mixed: bool, variant: str | None, say: Say):
    from effconv.convert import convert_checkpoint
    from effconv.models.efficientnet import EfficientNet
    from effconv.output.loading import load

    if artifact is not None:
        say(f"PyTorch: loading {artifact}")
        model = load(artifact)
        return model, model.card
    say("PyTorch: converting in memory")
    result = convert_checkpoint(src, ema=policy, allow_mixed=allow_mixed, variant=variant)
    card = ModelCard.from_json(result.card, where="the in-memory conversion's model card")  # a dict, or a card
    model = EfficientNet(card.arch, card.num_classes)
    model.load_state_dict(result.state_dict, strict=True)
    return model.eval(), card


def _policy_from_card(card: ModelCard) -> tuple[str, bool]:
    used = card.weights or "auto"
    return ("auto", True) if used == "mixed" else (used, False)


def verify(
    src: str | os.PathLike,
    artifact: str | os.PathLike | None = None,
    *,
    batch: int = 2,
    seed: int = 0,
    input_sizes: list[int] | None = None,
    images: str | os.PathLike | None = None,
    inputs: np.ndarray | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    per_layer: bool = False,
    ema: str = "auto",
    allow_mixed: bool = False,
    variant: str | None = None,
    say: Say | None = None,
) -> VerifyReport:
    """Compare TF and PyTorch on seeded N(0,1) batches (and optionally real images).

    `ema` picks the checkpoint's copies for an in-memory conversion (as `convert_checkpoint`); with
    `artifact`, the copies its card records are used. `atol`/`rtol`: None for the defaults of the
    weights' dtype (`DTYPE_TOLERANCES`: a float16 or bfloat16 artifact differs from TensorFlow by its
    rounding); either given replaces them (`resolve_tolerance`).
    """
    from effconv.formats import open_source
    from effconv.output.hashing import sha256_file

    say = say or (lambda _m: None)
    if batch < 1:
        raise UsageError("--batch must be at least 1")
    if (atol is not None and atol < 0) or (rtol is not None and rtol < 0):
        raise UsageError("--atol and --rtol must not be negative")
    artifact = str(artifact) if artifact is not None else None
    # Every argument is checked before the conversion and TensorFlow start (parity/arguments.py).
    image_paths = image_files(images) if images is not None else None
    if artifact is not None:
        check_weights_fit_source(src, artifact)
    torch_model, card = _torch_side(src, artifact, ema, allow_mixed, variant, say)
    if artifact is not None:
        ema, allow_mixed = _policy_from_card(card)
    dtype = card.dtype or "float32"
    atol, rtol, tolerance_from = resolve_tolerance(dtype, atol, rtol)
    notes: list[str] = []
    with open_source(src) as source:
        recorded = card.source_sha256
        if artifact is None:  # the in-memory conversion just hashed these very files
            hashes = recorded
        else:
            say("hashing the checkpoint")
            hashes = {p.name: sha256_file(p) for p in source.files}
        if artifact is not None and recorded and recorded != hashes:
            notes.append("the artifact's card records other source hashes: it was converted from another checkpoint")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's start-up chatter would bury the report
        tf_model, layout, choice = source.format.tf_reference(source, card.arch, ema, allow_mixed, say)
        if layout.num_classes != torch_model.num_classes:
            raise UsageError(
                f"the checkpoint has {layout.num_classes} classes but the PyTorch model {torch_model.num_classes}"
            )
        cases = []
        sizes = input_sizes if input_sizes is not None else [card.input_size()]
        if inputs is not None and not input_sizes:
            sizes = []
        batches = []
        for size in sizes:
            if size < 1:
                raise UsageError(f"--input-size must be positive, got {size}")
            desc = f"N(0,1) batch {batch}x{size}x{size}x3, seed {seed}"
            batches.append((f"{layout.arch}@{size}", desc, random_batch(batch, size, seed)))
        if inputs is not None:
            x = check_inputs(inputs)
            batches.append((f"{layout.arch}@inputs", f"given batch {'x'.join(map(str, x.shape))}", x))
        for name, desc, x in batches:
            case = compare_case(
                name, desc, x, tf_model, torch_model, atol=atol, rtol=rtol, per_layer=per_layer, say=say
            )
            cases.append(case)
        if image_paths is not None:
            cases.extend(_image_cases(image_paths, card, tf_model, torch_model, atol, rtol, per_layer, say))
        notes.extend(getattr(tf_model, "notes", ()))  # what a reference says it ran (Keras 3: per input size)
    return VerifyReport(
        arch=layout.arch,
        num_classes=layout.num_classes,
        weights=choice.used,
        source=str(source.origin),
        source_sha256=hashes,
        artifact=artifact,
        atol=atol,
        rtol=rtol,
        cases=cases,
        versions=versions(),
        notes=notes,
        dtype=dtype,
        tolerance_from=tolerance_from,
    )


def check_inputs(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 4 or x.shape[-1] != 3 or min(x.shape) < 1 or not np.issubdtype(x.dtype, np.floating):
        raise UsageError(f"inputs must be a float NHWC batch with 3 channels, got {x.dtype} {list(x.shape)}")
    return np.ascontiguousarray(x, dtype=np.float32)


def load_inputs(path: str | os.PathLike) -> np.ndarray:
    """An NHWC batch from .npy, or from .npz (array `x`, or its only array)."""
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UsageError(f"--inputs {path}: not a readable .npy/.npz file ({e})") from e
    if isinstance(data, np.lib.npyio.NpzFile):
        with data:
            keys = data.files
            if "x" not in keys and len(keys) != 1:
                raise UsageError(f"--inputs {path}: expected an array named 'x' or a single array, found {keys}")
            return check_inputs(data["x" if "x" in keys else keys[0]])
    return check_inputs(data)


def _image_cases(paths: list[Path], card: ModelCard, tf_model, torch_model, atol, rtol, per_layer, say):
    """Each image preprocessed twice: by TF's own ops (TF side) and by our numpy port (PyTorch side)."""
    from effconv.zoo import preprocess

    pre = card.needs_preprocessing("--images needs it")
    size = pre.image_size
    cases = []
    for path in paths:
        ours = preprocess.preprocess(path, size, pre.mean, pre.std, pre.crop_padding)[None]
        theirs = preprocess.preprocess_tf(path, size, pre.mean, pre.std, pre.crop_padding)[None]
        std = np.asarray(pre.std, dtype=np.float64)
        pre_diff = float((np.abs(ours.astype(np.float64) - theirs) * std).max())
        # The model difference is measured on identical input (TF's preprocessing) ...
        case = compare_case(
            f"{card.arch}:{path.name}",
            f"image {path.name}",
            theirs.astype(np.float32),
            tf_model,
            torch_model,
            atol=atol,
            rtol=rtol,
            per_layer=per_layer,
            say=say,
        )
        # ... and the preprocessing difference separately, on the 0-255 scale.
        case.preprocessing_max_abs = pre_diff
        cases.append(case)
    return cases
