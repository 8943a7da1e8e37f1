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
from effconv.zoo.preprocess import preprocess

IMAGENET_CLASSES_PATH = Path(__file__).with_name("imagenet_classes.tsv")  # WordNet id <TAB> class name


@cache
def imagenet_classes() -> tuple[tuple[str, str], ...]:
    """The 1000 ImageNet-1k classes in label order: (WordNet id, name)."""
    rows = IMAGENET_CLASSES_PATH.read_text(encoding="utf-8").splitlines()
    return tuple(tuple(row.split("\t", 1)) for row in rows if row)


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


def prepare(image: np.ndarray | str | os.PathLike | bytes, preprocessing: dict) -> np.ndarray:
    """One image -> CHW float32, ready to stack into a batch."""
    out = preprocess(
        image,
        int(preprocessing["image_size"]),
        preprocessing["mean"],
        preprocessing["std"],
        crop_padding=preprocessing.get("crop_padding", 32),
    )
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def _logits(model, batch: np.ndarray) -> torch.Tensor:
    if not getattr(model, "num_classes", 1):
        raise UsageError("the model has no classifier (num_classes 0): use model.extract_feat for features")
    with torch.inference_mode():
        return model(torch.from_numpy(batch)).float()


def inference_model(model, image: np.ndarray | str | os.PathLike | bytes, *, preprocessing: dict | None = None) -> dict:
    """Classify one image (a path, encoded bytes or an HxWx3 uint8 RGB array) with `model`.

    Returns `pred_label` (class index), `pred_score` (its softmax probability), `pred_class` (its name) and
    `pred_scores` (every class's probability, a float32 array).
    """
    settings = preprocessing or card_preprocessing(model)
    logits = _logits(model, prepare(image, settings)[None])[0]
    scores = torch.softmax(logits, dim=0)
    label = int(logits.argmax())  # ranked by logit: probabilities can tie at 0 or 1 in float32
    return {
        "pred_label": label,
        "pred_score": float(scores[label]),
        "pred_class": class_names(scores.numel())[label],
        "pred_scores": scores.numpy(),
    }


def predict(model, images: Sequence[str | os.PathLike], top_k: int = 5, batch_size: int = 8) -> list[dict]:
    """Top-k classes of each image file: [{image, top_k: [{label, class, score}, ...]}, ...]."""
    settings = card_preprocessing(model)
    results = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        logits = _logits(model, np.stack([prepare(path, settings) for path in chunk]))
        names = class_names(logits.shape[1])
        labels = logits.topk(min(top_k, logits.shape[1]), dim=1).indices
        values = torch.softmax(logits, dim=1).gather(1, labels)
        for path, row_values, row_labels in zip(chunk, values.tolist(), labels.tolist(), strict=True):
            ranked = [{"label": i, "class": names[i], "score": v} for i, v in zip(row_labels, row_values, strict=True)]
            results.append({"image": os.fspath(path), "top_k": ranked})
    return results
