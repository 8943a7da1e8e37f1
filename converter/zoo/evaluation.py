"""Top-1/top-5 accuracy of a converted model on an ImageNet-style folder, with the official preprocessing.

Two layouts:
- class sub-folders (`DIR/<class>/*.JPEG`): for a model with an ImageNet-1k head (1000 or 1001 classes) a
  folder named by a WordNet id (`n01440764`) is that ImageNet class; folders named by numbers are those
  labels; otherwise (and for every other head, e.g. 10 classes on an Imagenette-style folder) the sorted folder
  names are labels 0, 1, ...; a class map (`--class-map FILE`: lines `FOLDER [LABEL]`, a line without a
  label taking its line number) says it explicitly;
- a flat folder of images plus a labels file: lines `FILE LABEL` (LABEL a 0-based index in the sorted-WordNet-id
  order of ImageNet-1k, or a WordNet id; separated by whitespace or a comma), or one LABEL per line for the
  sorted image files. The devkit's `ILSVRC2012_validation_ground_truth.txt` uses other (1-based ILSVRC) ids
  and must be converted first.

An image that cannot be read stops the evaluation with an error naming it, or, with `skip_bad`, is left out
and listed in the result.
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
from effconv.zoo.devices import resolve_device
from effconv.zoo.inference import IMAGE_SUFFIXES, card_preprocessing, imagenet_classes, images_in, prepare

IMAGENET_HEADS = (1000, 1001)  # the heads whose labels are ImageNet-1k's (1001: background first)


@dataclass(frozen=True)
class LabelledImages:
    files: tuple[Path, ...]
    labels: tuple[int, ...]
    layout: str  # "class folders" or "flat + labels file"


def _label_of(text: str, wnids: dict[str, int], where: str) -> int:
    if text.isdigit():
        return int(text)
    if text in wnids:
        return wnids[text]
    raise UsageError(f"label {text!r} in {where} is neither a class index nor an ImageNet WordNet id")


def read_class_map(path: str | os.PathLike) -> dict[str, int]:
    """A class map file: lines `FOLDER LABEL`, or `FOLDER` alone (its label is its line number, from 0)."""
    try:
        lines = [line.split() for line in Path(path).read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read class map {path}: {getattr(e, 'strerror', None) or e}") from e
    mapping: dict[str, int] = {}
    for number, words in enumerate(w for w in lines if w):
        if len(words) > 2 or (len(words) == 2 and not words[1].isdigit()):
            raise UsageError(f"class map {path}: line {' '.join(words)!r} is not 'FOLDER' or 'FOLDER LABEL'")
        if words[0] in mapping:
            raise UsageError(f"class map {path}: folder {words[0]} is listed twice")
        mapping[words[0]] = int(words[1]) if len(words) == 2 else number
    if not mapping:
        raise UsageError(f"class map {path} is empty")
    return mapping


def _folder_labels(classes: list[Path], wnids: dict[str, int], num_classes: int | None, class_map) -> dict:
    """Each class folder's label: the class map's, ImageNet's (for an ImageNet head), a number, or sorted order."""
    if class_map is not None:
        missing = [p.name for p in classes if p.name not in class_map]
        if missing:
            raise UsageError(f"the class map does not list the folder(s) {', '.join(missing[:5])}")
        return {p: class_map[p.name] for p in classes}
    imagenet_head = num_classes is None or num_classes in IMAGENET_HEADS
    if imagenet_head and all(p.name in wnids for p in classes):
        return {p: wnids[p.name] for p in classes}
    if all(p.name.isdigit() for p in classes):
        return {p: int(p.name) for p in classes}
    return {p: i for i, p in enumerate(classes)}


def find_images(
    data: str | os.PathLike,
    labels_file: str | os.PathLike | None = None,
    *,
    num_classes: int | None = None,
    class_map: dict[str, int] | None = None,
) -> LabelledImages:
    """The images under `data` and their labels, in a fixed order.

    `num_classes` is the model's head: WordNet-named folders are ImageNet classes only for a 1000/1001-class
    head (or when it is not given); `class_map` ({folder: label}) overrides the folder rules.
    """
    root = Path(data)
    if not root.is_dir():
        raise UsageError(f"--data must be a folder: {root}")
    wnids = {wnid: i for i, (wnid, _) in enumerate(imagenet_classes())}
    if labels_file is not None:
        return _flat_with_labels(root, Path(labels_file), wnids)
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    if not classes:
        raise UsageError(f"{root} has no class sub-folders; for a flat folder pass --labels FILE")
    label_of = _folder_labels(classes, wnids, num_classes, class_map)
    files, labels = [], []
    for folder in classes:
        for path in images_in(folder):
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
        files = images_in(root)
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
    """Decoded and preprocessed images with their labels (picklable, for DataLoader workers).

    An image that cannot be read gives zeros and its one-line error (else ""): the error reaches the main
    process as data, not as a worker's traceback, and the caller decides to stop or skip.
    """

    def __init__(self, files: tuple[Path, ...], labels: tuple[int, ...], preprocessing: dict):
        self.files, self.labels, self.preprocessing = files, labels, preprocessing

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        try:
            return torch.from_numpy(prepare(self.files[index], self.preprocessing)), self.labels[index], ""
        except UsageError as e:
            size = int(self.preprocessing["image_size"])
            return torch.zeros(3, size, size), self.labels[index], str(e)


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
    device: str | torch.device | None = "cpu",
    progress: Callable[[int, int], None] | None = None,
    skip_bad: bool = False,
    class_map: dict[str, int] | None = None,
) -> EvalResult:
    """Accuracy of `model` (with its card) on the images under `data`; `limit` keeps the first N.

    An unreadable image raises UsageError naming it; with `skip_bad` it is left out, counted and listed in the
    result's `skipped` (file and reason). `device` None: cuda when available.
    """
    settings = card_preprocessing(model)
    device = resolve_device(device)
    found = find_images(data, labels_file, num_classes=model.num_classes, class_map=class_map)
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
    skipped: list[dict[str, str]] = []
    start = time.perf_counter()
    with torch.inference_mode():
        for first, (batch, target, errors) in zip(range(0, len(files), batch_size), loader, strict=True):
            readable = _readable(files[first : first + len(errors)], errors, skip_bad, skipped)
            if readable.any():
                logits = model(batch[readable].to(device))
                top = logits.topk(k, dim=1).indices.cpu()
                hits = top == target[readable][:, None]
                correct1 += int(hits[:, 0].sum())
                correct5 += int(hits.any(dim=1).sum())
                seen += int(readable.sum())
            if progress:
                progress(seen + len(skipped), len(files))
    seconds = time.perf_counter() - start
    if not seen:
        raise UsageError(f"none of the {len(files)} images could be read (first: {skipped[0]['error']})")
    details = {
        "data": os.fspath(data),
        "layout": found.layout,
        "labels_file": None if labels_file is None else os.fspath(labels_file),
        "limit": limit,
        "batch_size": batch_size,
        "workers": workers,
        "device": str(device),
        "skipped_count": len(skipped),
        "skipped": skipped,
        "preprocessing": settings,
        "effconv_version": __version__,
    }
    return EvalResult(seen, 100.0 * correct1 / seen, 100.0 * correct5 / seen, seconds, details)


def _readable(files, errors: list[str], skip_bad: bool, skipped: list[dict[str, str]]) -> torch.Tensor:
    """Which images of a batch were read; an unreadable one stops the evaluation unless `skip_bad`."""
    for path, error in zip(files, errors, strict=True):
        if error and not skip_bad:
            raise UsageError(f"{error} (--skip-bad leaves unreadable images out)")
        if error:
            skipped.append({"file": os.fspath(path), "error": error})
    return torch.tensor([not error for error in errors], dtype=torch.bool)
