"""Classify images with a converted model, preprocessed exactly as its model card says."""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np
import torch

from effconv.card import ModelCard
from effconv.errors import UsageError
from effconv.zoo.pipelines import prepare  # noqa: F401 (re-exported: effconv.zoo.inference.prepare is public)

IMAGENET_CLASSES_PATH = Path(__file__).with_name("imagenet_classes.tsv")  # WordNet id <TAB> class name
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


@cache
def imagenet_classes() -> tuple[tuple[str, str], ...]:
    """The 1000 ImageNet-1k classes in label order: (WordNet id, name)."""
    rows = IMAGENET_CLASSES_PATH.read_text(encoding="utf-8").splitlines()
    return tuple(tuple(row.split("\t", 1)) for row in rows if row)


def images_in(folder: Path) -> list[Path]:
    """The image files directly in `folder`, sorted."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def image_paths(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Files as given, each folder replaced by its images (sorted); a folder without images is an error."""
    out = []
    for path in map(Path, paths):
        if path.is_dir():
            found = images_in(path)
            if not found:
                raise UsageError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in the folder {path}")
            out += found
        else:
            out.append(path)
    return out


def read_class_names(path: str | os.PathLike, num_classes: int) -> list[str]:
    """Class names from a file, one per line in label order; there must be one per class of the head."""
    try:
        names = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read class names {path}: {getattr(e, 'strerror', None) or e}") from e
    if len(names) != num_classes:
        raise UsageError(f"{path} names {len(names)} classes, but the model has {num_classes}")
    return names


def class_names(num_classes: int) -> list[str]:
    """Names for a head of `num_classes` outputs: ImageNet's for 1000 (1001: background first), else class_i."""
    names = [name for _, name in imagenet_classes()]
    if num_classes == len(names):
        return names
    if num_classes == len(names) + 1:
        return ["background", *names]
    return [f"class_{i}" for i in range(num_classes)]


def card_preprocessing(model) -> dict:
    """The preprocessing recorded in the model's card (`effconv.models.load` attaches it), as settings."""
    card = getattr(model, "card", None)
    hint = "pass preprocessing={'image_size': ..., 'mean': ..., 'std': ...}"
    if isinstance(card, ModelCard):
        return card.needs_preprocessing(f"it says how to preprocess; or {hint}").to_json()
    if not card or "preprocessing" not in card:  # a card set by hand is a dict
        raise UsageError(
            "the model has no model card to say how to preprocess; load it with effconv.get_model or "
            f"effconv.models.load, or {hint}"
        )
    return card["preprocessing"]


def _logits(model, batch: np.ndarray) -> torch.Tensor:
    if not getattr(model, "num_classes", 1):
        raise UsageError("the model has no classifier (num_classes 0): use model.extract_feat for features")
    weight = next(model.parameters(), None)
    x = torch.from_numpy(batch)
    if weight is not None:
        x = x.to(weight.device, weight.dtype)
    with torch.inference_mode():
        return model(x).float().cpu()


Image = np.ndarray | str | os.PathLike | bytes


def inference_model(
    model, image: Image | list[Image] | tuple[Image, ...], *, preprocessing: dict | None = None, batch_size: int = 8
) -> dict | list[dict]:
    """Classify an image (a path, encoded bytes or an HxWx3 uint8 RGB array), or a list of them, with `model`.

    Returns, per image, `pred_label` (class index), `pred_score` (its softmax probability), `pred_class` (its
    name) and `pred_scores` (every class's probability, a float32 array): a dict for one image, a list of
    dicts for a list (run in batches of `batch_size`), as mmpretrain's `inference_model`.
    """
    settings = preprocessing or card_preprocessing(model)
    if not isinstance(image, (list, tuple)):
        return _classified(_logits(model, prepare(image, settings)[None]))[0]
    results = []
    for start in range(0, len(image), batch_size):
        chunk = image[start : start + batch_size]
        results += _classified(_logits(model, np.stack([prepare(one, settings) for one in chunk])))
    return results


def _classified(logits: torch.Tensor) -> list[dict]:
    scores = torch.softmax(logits, dim=1)
    names = class_names(logits.shape[1])
    out = []
    for row_logits, row_scores in zip(logits, scores, strict=True):
        label = int(row_logits.argmax())  # ranked by logit: probabilities can tie at 0 or 1 in float32
        out.append(
            {
                "pred_label": label,
                "pred_score": float(row_scores[label]),
                "pred_class": names[label],
                "pred_scores": row_scores.numpy(),
            }
        )
    return out


def predict(
    model,
    images: Sequence[str | os.PathLike],
    top_k: int = 5,
    batch_size: int = 8,
    *,
    names: Sequence[str] | None = None,
    keep_going: bool = False,
) -> list[dict]:
    """Top-k classes of each image file (a folder stands for its images): [{image, top_k: [{label, class,
    score}, ...]}, ...].

    `names`: the class names (default: ImageNet's for 1000/1001 classes, else class_i). An unreadable image
    raises UsageError naming it; with `keep_going` it gets {image, error} in its place and the rest go on.
    """
    settings = card_preprocessing(model)
    paths = image_paths(images)
    results = []
    for start in range(0, len(paths), batch_size):
        prepared, failed = {}, {}
        for path in paths[start : start + batch_size]:
            try:
                prepared[path] = prepare(path, settings)
            except UsageError as e:
                if not keep_going:
                    raise
                failed[path] = str(e)
        ranked = _ranked(model, prepared, top_k, names) if prepared else {}
        for path in paths[start : start + batch_size]:
            done = {"top_k": ranked[path]} if path in ranked else {"error": failed[path]}
            results.append({"image": os.fspath(path), **done})
    return results


def _ranked(model, prepared: dict, top_k: int, names: Sequence[str] | None) -> dict:
    logits = _logits(model, np.stack(list(prepared.values())))
    names = names or class_names(logits.shape[1])
    labels = logits.topk(min(top_k, logits.shape[1]), dim=1).indices
    values = torch.softmax(logits, dim=1).gather(1, labels)
    return {
        path: [{"label": i, "class": names[i], "score": v} for i, v in zip(row_labels, row_values, strict=True)]
        for path, row_values, row_labels in zip(prepared, values.tolist(), labels.tolist(), strict=True)
    }
