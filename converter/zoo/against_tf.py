"""`effconv eval --against-tf`: every image of an evaluation through TensorFlow as well, the two compared.

The PyTorch side is the evaluation itself: effconv's preprocessing and the converted weights. The TensorFlow
side preprocesses each image with TensorFlow's own ops, as the card's pipeline says (the TPU repo's: decode,
centre crop, TF1 legacy `resize_bicubic`; EfficientNetV2 S-XL: automl's crop rule and TF2's bilinear
`tf.image.resize`), and runs effconv's TF reference model, built by the source format from the checkpoint the
weights were converted from, with the copies (EMA or raw) the card records, as `effconv verify` builds it.

Per image: each side's top-1 class, the largest |logit difference| and the largest preprocessing difference.
Totals: top-1 agreement, the largest and the 99.9th percentile of the per-image largest |logit difference|,
the images beyond `effconv verify`'s tolerance for the weights' dtype, the images whose top-1 differ, and
TensorFlow's own top-1/top-5. The comparison runs in one process (the TF reference is not sharded).

Importing this module imports neither TensorFlow nor torch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from effconv.card import ModelCard
from effconv.errors import UsageError, one_line

Say = Callable[[str], None]
PERCENTILE = 99.9
WORST = 10  # the images with the largest differences, listed with their figures


def check_runnable(processes: int, amp: str | None) -> None:
    """The comparison runs in one process, on the exact float32 path."""
    if processes > 1:
        raise UsageError(
            f"--against-tf runs in one process (the TensorFlow reference is not sharded), not {processes}: leave "
            "out --nproc / torchrun, or use --limit for a subset"
        )
    if amp is not None:
        raise UsageError(f"--against-tf checks the exact float32 path: leave out --amp {amp}")


def source_for(weights: str | os.PathLike, src: str | os.PathLike | None) -> str:
    """The checkpoint the TF side reads: `src`, else the path the card of `weights` records (checked to exist).

    Either way the checkpoint must hold the card's arch (names and shapes only, no tensor data read).
    """
    from effconv.output.artifact import read_card
    from effconv.parity.arguments import check_weights_fit_source

    if src is None:
        card = read_card(weights)
        recorded = (card.source or {}).get("path")
        if not isinstance(recorded, str) or not recorded:
            raise UsageError(
                f"--against-tf needs the checkpoint {weights} was converted from: its card records no source "
                "path; give --src CHECKPOINT"
            )
        if not Path(recorded).expanduser().exists():
            raise UsageError(
                f"--against-tf: the card of {weights} records the source {recorded}, which is not there "
                "(moved, or a path relative to another folder); give --src CHECKPOINT"
            )
        src = recorded
    check_weights_fit_source(src, weights)
    return os.fspath(src)


def _ema_of(card: ModelCard) -> tuple[str, bool]:
    """The EMA policy that picks, from the checkpoint, the copies the card says the conversion used."""
    used = card.weights
    if used == "mixed":
        return "auto", True
    return (used, False) if used in ("ema", "raw") else ("auto", False)


@dataclass
class TFReference:
    """The TF side: effconv's TF reference model with the checkpoint's weights, and where they came from."""

    model: Callable[[np.ndarray], np.ndarray]  # NHWC batch, normalised as the card says -> logits
    arch: str
    num_classes: int
    source: str
    source_sha256: dict[str, str]
    weights: str  # the copies read: ema, raw, mixed (or the format's own word)
    notes: list[str] = field(default_factory=list)


def build_reference(src: str | os.PathLike, card: ModelCard, say: Say | None = None) -> TFReference:
    """The TF reference model of `card`'s arch from the checkpoint `src` (TensorFlow reads it), as `verify` does."""
    from effconv.formats import open_source
    from effconv.output.hashing import sha256_file

    say = say or (lambda _m: None)
    ema, allow_mixed = _ema_of(card)
    with open_source(src) as source:
        say("hashing the checkpoint")
        hashes = {p.name: sha256_file(p) for p in source.files}
        notes = []
        if card.source_sha256 and card.source_sha256 != hashes:
            notes.append("the weights' card records other source hashes: they were converted from another checkpoint")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        model, held, choice = source.format.tf_reference(source, card.arch, ema, allow_mixed, say)
        origin = os.fspath(source.origin)
    if held.num_classes != card.num_classes:
        raise UsageError(f"the checkpoint {src} has {held.num_classes} classes but the weights {card.num_classes}")
    if not card.num_classes:
        raise UsageError("--against-tf compares logits: the weights have no classifier (num_classes 0)")
    return TFReference(model, held.arch, held.num_classes, origin, hashes, choice.used, notes)


def tf_preprocess(path: str | os.PathLike, preprocessing: dict) -> np.ndarray:
    """One image file through TensorFlow's own ops, as the card's `preprocessing` says: S x S x 3 float32.

    TF1 legacy bicubic cards: `effconv.zoo.preprocess.preprocess_tf` (the whole image decoded, then cropped).
    `bilinear-tf2` cards (EfficientNetV2 S-XL): automl's `preprocess_for_eval`, a centre crop unless the card
    says `crop` "none" (offsets floor((h - side) / 2) with `crop_offset` "floor"), then `tf.image.resize`.
    """
    from effconv.zoo.pipelines import pipeline_of

    recipe = TF_PIPELINES[pipeline_of(preprocessing).interpolation]
    return recipe.run(path, preprocessing, int(preprocessing["image_size"]))


def _tpu_eval(path: str | os.PathLike, preprocessing: dict, size: int) -> np.ndarray:
    from effconv.zoo.preprocess import preprocess_tf

    padding = preprocessing.get("crop_padding", 32)
    return preprocess_tf(path, size, preprocessing["mean"], preprocessing["std"], padding)


def _automl_eval(path: str | os.PathLike, preprocessing: dict, size: int) -> np.ndarray:
    import tensorflow as tf

    try:
        image = tf.io.decode_image(tf.io.read_file(os.fspath(path)), channels=3, expand_animations=False)
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as e:
        raise UsageError(f"cannot read image {os.fspath(path)}: {one_line(e.message, max_lines=1)}") from None
    if preprocessing.get("crop", "center") != "none":
        height, width = tf.shape(image)[0], tf.shape(image)[1]
        ratio = size / (size + int(preprocessing.get("crop_padding") or 32))
        side = tf.cast(ratio * tf.cast(tf.minimum(height, width), tf.float32), tf.int32)
        odd = 0 if preprocessing.get("crop_offset", "ceil") == "floor" else 1
        top, left = (height - side + odd) // 2, (width - side + odd) // 2
        image = image[top : top + side, left : left + side]
    resized = tf.image.resize(image, [size, size])  # TF2: bilinear, half-pixel centres, float32
    mean = tf.constant(preprocessing["mean"], tf.float32)
    return ((resized - mean) / tf.constant(preprocessing["std"], tf.float32)).numpy()


def _automl_steps(preprocessing: dict) -> str:
    crop = "no crop" if preprocessing.get("crop") == "none" else "automl's centre crop"
    return f"tf.io.decode_image, {crop}, tf.image.resize (bilinear), (x - mean) / std"


@dataclass(frozen=True)
class _TFPipeline:
    """TensorFlow's own ops for one of `pipelines.PIPELINES` (keyed alike), and how the result names them."""

    run: Callable[[str | os.PathLike, dict, int], np.ndarray]
    steps: Callable[[dict], str]


TF_PIPELINES = {
    "bicubic-tf1-legacy": _TFPipeline(
        _tpu_eval,
        lambda _: "tf.io.decode_image, centre crop (float32 size), tf.compat.v1.image.resize_bicubic, (x - mean) / std",
    ),
    "bilinear-tf2": _TFPipeline(_automl_eval, _automl_steps),
}


class AgainstTF:
    """Collects, batch by batch of an evaluation, PyTorch's logits against TensorFlow's on the same images.

    `add` is given the images of a batch that PyTorch read (their files, labels, its preprocessed NCHW batch
    and its logits); it preprocesses those files with TensorFlow, runs the TF reference and keeps per-image
    figures. `summary` gives the totals (see the module).
    """

    def __init__(self, reference: TFReference, preprocessing: dict, dtype: str | None = None):
        from effconv.parity.verify import resolve_tolerance

        self.reference, self.preprocessing = reference, preprocessing
        self.atol, self.rtol, self.tolerance_from = resolve_tolerance(dtype, None, None)
        self.dtype = dtype or "float32"
        self.std = np.asarray(preprocessing["std"], dtype=np.float64)
        self.files: list[str] = []
        self.labels: list[int] = []
        self.max_diff: list[float] = []  # per image: max |torch logit - TF logit|
        self.tf_absmax: list[float] = []  # per image: max |TF logit|, for its tolerance
        self.torch_top1: list[int] = []
        self.tf_top1: list[int] = []
        self.tf_top5_hit: list[bool] = []
        self.preprocessing_max = 0.0  # 0-255 scale
        self.tf_errors: list[dict[str, str]] = []
        self.seconds_tf = 0.0

    def add(self, files: Sequence[Path], labels: Sequence[int], readable: Sequence[bool], x, logits) -> None:
        """One batch: `x` (NCHW torch tensor) and `logits` hold only the `readable` images, in order."""
        import time

        start = time.perf_counter()
        ours_x = x.detach().float().cpu().numpy()
        ours = logits.detach().float().cpu().numpy()
        read = [(path, label) for path, label, ok in zip(files, labels, readable, strict=True) if ok]
        kept, tf_inputs = [], []
        for position, (path, label) in enumerate(read):  # position: in `x` and `logits`
            try:
                tf_inputs.append(tf_preprocess(path, self.preprocessing))
            except UsageError as e:  # effconv read it, TensorFlow cannot (e.g. a format TF does not decode)
                self.tf_errors.append({"file": os.fspath(path), "error": str(e)})
                continue
            kept.append((position, path, label))
        if kept:
            positions = [p for p, _, _ in kept]
            theirs_x = np.stack(tf_inputs)
            pre = np.abs(ours_x[positions].transpose(0, 2, 3, 1).astype(np.float64) - theirs_x) * self.std
            self.preprocessing_max = max(self.preprocessing_max, float(pre.max()))
            theirs = np.asarray(self.reference.model(theirs_x), dtype=np.float64)
            self._tally(kept, ours[positions].astype(np.float64), theirs)
        self.seconds_tf += time.perf_counter() - start

    def _tally(self, kept: list, ours: np.ndarray, theirs: np.ndarray) -> None:
        top5 = np.argsort(-theirs, axis=1, kind="stable")[:, : min(5, theirs.shape[1])]
        for row, (_, path, label) in enumerate(kept):
            self.files.append(os.fspath(path))
            self.labels.append(int(label))
            self.max_diff.append(float(np.abs(ours[row] - theirs[row]).max()))
            self.tf_absmax.append(float(np.abs(theirs[row]).max()))
            self.torch_top1.append(int(ours[row].argmax()))
            self.tf_top1.append(int(theirs[row].argmax()))
            self.tf_top5_hit.append(bool(label in top5[row]))

    def summary(self, resumed: int = 0) -> dict:
        """The figures of every image compared so far (see the module); JSON-ready."""
        images = len(self.files)
        diff = np.asarray(self.max_diff, dtype=np.float64)
        limit = self.atol + self.rtol * np.asarray(self.tf_absmax, dtype=np.float64)
        beyond = np.flatnonzero(diff > limit)
        differ = [f for f, a, b in zip(self.files, self.torch_top1, self.tf_top1, strict=True) if a != b]
        worst = np.argsort(-(diff / limit), kind="stable")[:WORST] if images else []
        ref = self.reference
        notes = list(ref.notes)
        if resumed:
            notes.append(
                f"{resumed} image(s) resumed from the predictions file were not run through TensorFlow: the figures "
                f"cover the {images} image(s) evaluated in this run"
            )
        return {
            "arch": ref.arch,
            "num_classes": ref.num_classes,
            "source": ref.source,
            "source_sha256": ref.source_sha256,
            "weights": ref.weights,
            "tensorflow_preprocessing": self._pipeline(),
            "images": images,
            "passed": bool(images) and not len(beyond),
            "top1_agreement": _fraction(images - len(differ), images),
            "top1_differ_count": len(differ),
            "top1_differ": differ,
            "max_abs_logit_diff": float(diff.max()) if images else None,
            "p999_abs_logit_diff": float(np.percentile(diff, PERCENTILE)) if images else None,
            "max_abs_tf_logit": float(max(self.tf_absmax)) if images else None,
            "tolerance": (
                f"{self.dtype} weights, {self.tolerance_from}: per image, max|torch - tf| <= {self.atol:g} + "
                f"{self.rtol:g} * max|tf logit| (as effconv verify)"
            ),
            "beyond_tolerance_count": int(len(beyond)),
            "largest_differences": [
                {"file": self.files[i], "max_abs_logit_diff": float(diff[i]), "limit": float(limit[i])} for i in worst
            ],
            "preprocessing_max_abs": self.preprocessing_max if images else None,
            "tf_top1": _percent(sum(p == y for p, y in zip(self.tf_top1, self.labels, strict=True)), images),
            "tf_top5": _percent(sum(self.tf_top5_hit), images),
            "tf_errors_count": len(self.tf_errors),
            "tf_errors": self.tf_errors,
            "seconds_tf": round(self.seconds_tf, 3),
            "notes": notes,
        }

    def _pipeline(self) -> str:
        from effconv.zoo.pipelines import pipeline_of

        return TF_PIPELINES[pipeline_of(self.preprocessing).interpolation].steps(self.preprocessing)


def _fraction(count: int, total: int) -> float | None:
    return count / total if total else None


def _percent(count: int, total: int) -> float | None:
    return 100.0 * count / total if total else None


def summary_lines(figures: dict) -> list[str]:
    """What `effconv eval --against-tf` prints of the comparison."""
    if not figures["images"]:
        return ["TensorFlow: no image could be compared (TensorFlow read none of them)"]
    agreement = figures["top1_agreement"]
    lines = [
        f"TensorFlow: top-1 agreement {100 * agreement:.2f} % ({figures['top1_differ_count']} of {figures['images']} "
        f"images differ); max |logit diff| {figures['max_abs_logit_diff']:.3g}, p99.9 "
        f"{figures['p999_abs_logit_diff']:.3g} (largest |TF logit| {figures['max_abs_tf_logit']:.3g}); "
        f"preprocessing max |diff| {figures['preprocessing_max_abs']:.3g} (0-255)",
        f"TensorFlow's own accuracy: top-1 {figures['tf_top1']:.2f} %  top-5 {figures['tf_top5']:.2f} % (its "
        f"preprocessing and model took {figures['seconds_tf']:.1f} s of the run)",
    ]
    if figures["tf_errors_count"]:
        lines.append(f"TensorFlow could not read {figures['tf_errors_count']} image(s) effconv read (listed)")
    return lines


def markdown_table(results: Sequence[dict]) -> str:
    """A Markdown table of `effconv eval --against-tf` results (their JSON), one row each: the parity report's."""
    lines = [
        "| model | images | top-1 agreement | max \\|logit diff\\| | p99.9 | max \\|TF logit\\| | beyond tolerance "
        "| preprocessing max \\|diff\\| | top-1 / top-5 PyTorch | top-1 / top-5 TF | top-1 differs on | result |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        f = result["against_tf"]
        differ = ", ".join(Path(p).name for p in f["top1_differ"][:5]) + (" ..." if f["top1_differ_count"] > 5 else "")
        cells = [
            f"efficientnet-{f['arch']} ({f['weights']})",
            str(f["images"]),
            _number(f["top1_agreement"], "{:.4f}"),
            _number(f["max_abs_logit_diff"]),
            _number(f["p999_abs_logit_diff"]),
            _number(f["max_abs_tf_logit"]),
            str(f["beyond_tolerance_count"]),
            _number(f["preprocessing_max_abs"]),
            f"{result['top1']:.1f} / {result['top5']:.1f} %",
            f"{_number(f['tf_top1'], '{:.1f}')} / {_number(f['tf_top5'], '{:.1f}')} %",
            differ or "-",
            "PASS" if f["passed"] else "**FAIL**",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _number(value: float | None, form: str = "{:.3g}") -> str:
    return "-" if value is None else form.format(value)
