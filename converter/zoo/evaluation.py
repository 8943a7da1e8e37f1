"""Top-1/top-5 accuracy of a converted model on an ImageNet-style folder, with the official preprocessing.

Two layouts:
- class sub-folders (`DIR/<class>/*.JPEG`): a folder named by a WordNet id (`n01440764`) is that ImageNet
  class, one named by a number is that label, otherwise the sorted folder names are labels 0, 1, ...;
- a flat folder of images plus a labels file: lines `FILE LABEL` (LABEL a 0-based index in the sorted-WordNet-id
  order of ImageNet-1k, or a WordNet id; separated by whitespace or a comma), or one LABEL per line for the
  sorted image files. The devkit's `ILSVRC2012_validation_ground_truth.txt` uses other (1-based ILSVRC) ids
  and must be converted first.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from effconv import __version__
from effconv.errors import UsageError
from effconv.zoo.inference import card_preprocessing, imagenet_classes, prepare

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


@dataclass(frozen=True)
class LabelledImages:
    files: tuple[Path, ...]
    labels: tuple[int, ...]
    layout: str  # "class folders" or "flat + labels file"


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _label_of(text: str, wnids: dict[str, int], where: str) -> int:
    if text.isdigit():
        return int(text)
    if text in wnids:
        return wnids[text]
    raise UsageError(f"label {text!r} in {where} is neither a class index nor an ImageNet WordNet id")


def find_images(data: str | os.PathLike, labels_file: str | os.PathLike | None = None) -> LabelledImages:
    """The images under `data` and their labels, in a fixed order."""
    root = Path(data)
    if not root.is_dir():
        raise UsageError(f"--data must be a folder: {root}")
    wnids = {wnid: i for i, (wnid, _) in enumerate(imagenet_classes())}
    if labels_file is not None:
        return _flat_with_labels(root, Path(labels_file), wnids)
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    if not classes:
        raise UsageError(f"{root} has no class sub-folders; for a flat folder pass --labels FILE")
    if all(p.name in wnids for p in classes):
        label_of = {p: wnids[p.name] for p in classes}
    elif all(p.name.isdigit() for p in classes):
        label_of = {p: int(p.name) for p in classes}
    else:
        label_of = {p: i for i, p in enumerate(classes)}
    files, labels = [], []
    for folder in classes:
        for path in _images_in(folder):
            files.append(path)
            labels.append(label_of[folder])
    if not files:
        raise UsageError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in the class folders of {root}")
    return LabelledImages(tuple(files), tuple(labels), "class folders")


def _flat_with_labels(root: Path, labels_file: Path, wnids: dict[str, int]) -> LabelledImages:
    try:
        lines = [line.strip() for line in labels_file.read_text().splitlines() if line.strip()]
    except OSError as e:
        raise UsageError(f"cannot read labels file {labels_file}: {e.strerror or e}") from e
    rows = [re.split(r"[,\s]+", line) for line in lines]
    if rows and rows[0][0].lower() in ("imageid", "file", "filename", "image"):
        rows = rows[1:]  # a CSV header
    if all(len(row) == 1 for row in rows):
        files = _images_in(root)
        if len(files) != len(rows):
            raise UsageError(f"{labels_file} has {len(rows)} labels but {root} holds {len(files)} images")
        labels = [_label_of(row[0], wnids, str(labels_file)) for row in rows]
        return LabelledImages(tuple(files), tuple(labels), "flat + labels file")
    files, labels = [], []
    for row in rows:
        path = root / row[0]
        if not path.is_file():
            matches = [p for p in root.glob(f"{row[0]}.*") if p.suffix.lower() in IMAGE_SUFFIXES]
            if len(matches) != 1:
                raise UsageError(f"image {row[0]} named in {labels_file} is not in {root}")
            path = matches[0]
        files.append(path)
        labels.append(_label_of(row[1], wnids, str(labels_file)))
    order = sorted(range(len(files)), key=lambda i: files[i])
    return LabelledImages(tuple(files[i] for i in order), tuple(labels[i] for i in order), "flat + labels file")


class ImageDataset(torch.utils.data.Dataset):
    """Decoded and preprocessed images with their labels (picklable, for DataLoader workers)."""

    def __init__(self, files: tuple[Path, ...], labels: tuple[int, ...], preprocessing: dict):
        self.files, self.labels, self.preprocessing = files, labels, preprocessing

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(prepare(self.files[index], self.preprocessing)), self.labels[index]


@dataclass
class EvalResult:
    images: int
    top1: float  # percent
    top5: float
    seconds: float
    details: dict = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        return {
            "images": self.images,
            "top1": self.top1,
            "top5": self.top5,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 2),
            **self.details,
        }


def evaluate(
    model,
    data: str | os.PathLike,
    *,
    labels_file: str | os.PathLike | None = None,
    batch_size: int = 32,
    workers: int = 0,
    limit: int | None = None,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """Accuracy of `model` (with its card) on the images under `data`; `limit` keeps the first N."""
    settings = card_preprocessing(model)
    found = find_images(data, labels_file)
    files, labels = found.files[:limit], found.labels[:limit]
    offset = 1 if model.num_classes == len(imagenet_classes()) + 1 else 0  # 1001 classes: background is 0
    labels = tuple(label + offset for label in labels)
    if max(labels) >= model.num_classes:
        raise UsageError(f"label {max(labels)} does not exist in a model of {model.num_classes} classes")
    loader = torch.utils.data.DataLoader(
        ImageDataset(files, labels, settings), batch_size=batch_size, num_workers=workers, shuffle=False
    )
    k = min(5, model.num_classes)
    model = model.to(device)
    correct1 = correct5 = seen = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for batch, target in loader:
            logits = model(batch.to(device))
            top = logits.topk(k, dim=1).indices.cpu()
            hits = top == target[:, None]
            correct1 += int(hits[:, 0].sum())
            correct5 += int(hits.any(dim=1).sum())
            seen += len(target)
            if progress:
                progress(seen, len(files))
    seconds = time.perf_counter() - start
    details = {
        "data": os.fspath(data),
        "layout": found.layout,
        "labels_file": None if labels_file is None else os.fspath(labels_file),
        "limit": limit,
        "batch_size": batch_size,
        "workers": workers,
        "device": str(device),
        "preprocessing": settings,
        "effconv_version": __version__,
    }
    return EvalResult(seen, 100.0 * correct1 / seen, 100.0 * correct5 / seen, seconds, details)
