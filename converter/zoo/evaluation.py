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

Under torchrun (or `effconv eval --nproc N`) the sorted image list is shared out by rank in contiguous
blocks, nothing repeated (distributed.py); after each batch every process's per-image rows are gathered, so
that every process takes the same decisions (an unreadable image stops them all) and rank 0 writes the rows
to the predictions file (predictions.py), from which an interrupted run resumes.

With an `against_tf.AgainstTF` (`effconv eval --against-tf`) every batch PyTorch read also goes through
TensorFlow's preprocessing and the TF reference model, and the result holds the comparison; one process only.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from effconv import __version__
from effconv.errors import UsageError
from effconv.zoo import distributed, pipelines
from effconv.zoo.devices import resolve_device
from effconv.zoo.inference import IMAGE_SUFFIXES, card_preprocessing, imagenet_classes, images_in, prepare
from effconv.zoo.predictions import TOP, PredictionsFile, rounded

if TYPE_CHECKING:
    from effconv.zoo.against_tf import AgainstTF

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
    process as data, not as a worker's traceback, and the caller decides to stop or skip. `crops_only`: each
    item is the decoded crop (HxWx3 uint8 tensor, sizes differ), resized later on the model's device
    (`pipelines.prepare_on_device`); batch them with `collate_crops`.
    """

    def __init__(self, files: tuple[Path, ...], labels: tuple[int, ...], preprocessing: dict, crops_only=False):
        self.files, self.labels, self.preprocessing = files, labels, preprocessing
        self.crops_only = crops_only
        if not crops_only:  # readied once here (e.g. compiled): forked workers inherit it, spawned ones load it
            pipelines.pipeline_of(preprocessing).warm()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        try:
            if self.crops_only:
                return torch.from_numpy(pipelines.crop(self.files[index], self.preprocessing)), self.labels[index], ""
            return torch.from_numpy(prepare(self.files[index], self.preprocessing)), self.labels[index], ""
        except UsageError as e:
            if self.crops_only:
                return torch.zeros(1, 1, 3, dtype=torch.uint8), self.labels[index], str(e)
            size = int(self.preprocessing["image_size"])
            return torch.zeros(3, size, size), self.labels[index], str(e)


def collate_crops(items: list) -> tuple[list[torch.Tensor], torch.Tensor, list[str]]:
    """A batch of `ImageDataset(crops_only=True)` items: the crops as a list (their sizes differ)."""
    crops, labels, errors = zip(*items, strict=True)
    return list(crops), torch.tensor(labels), list(errors)


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class EvalResult:
    images: int  # read and classified, those of a resumed run's earlier part included
    top1: float  # percent
    top5: float
    seconds: float
    details: dict = field(default_factory=dict)
    evaluated: int | None = None  # images that went through this run (a resumed run's own part); None: all

    @property
    def images_per_second(self) -> float:
        done = self.images if self.evaluated is None else self.evaluated
        return done / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        return {
            "images": self.images,
            "top1": self.top1,
            "top5": self.top5,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 2),
            **self.details,
        }


@dataclass
class _Tally:
    """Counts over per-image rows (see predictions.py), wherever they come from: this run or the file resumed."""

    files: dict[str, Path]
    seen: int = 0
    correct1: int = 0
    correct5: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)

    def add(self, rows: list[dict]) -> None:
        for row in rows:
            if "error" in row:
                self.skipped.append({"file": os.fspath(self.files[row["path"]]), "error": row["error"]})
                continue
            self.seen += 1
            self.correct1 += row["top5"][0] == row["label"]
            self.correct5 += row["label"] in row["top5"]

    @property
    def done(self) -> int:
        return self.seen + len(self.skipped)


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
    predictions: str | os.PathLike | None = None,
    amp: str | None = None,
    against_tf: AgainstTF | None = None,
    resize_on_device: bool = False,
) -> EvalResult:
    """Accuracy of `model` (with its card) on the images under `data`; `limit` keeps the first N.

    An unreadable image raises UsageError naming it; with `skip_bad` it is left out, counted and listed in the
    result's `skipped` (file and reason). `device` None: cuda when available. `predictions`: a .jsonl or .csv
    file of per-image results, appended as the run goes; when it already holds rows of this run, those
    images are skipped and counted from the file. `amp` ("bf16", "fp16"): autocast, not the exact path.

    Inside a joined process group (`distributed.process_group`, under torchrun) each process evaluates its
    share of the image list and every process gets the totals; rank 0 alone writes `predictions` and
    calls `progress`.

    `against_tf` (one process, exact path only): each batch PyTorch read goes through TensorFlow too, and the
    result's `against_tf` holds the comparison (`AgainstTF.summary`); images resumed from `predictions` are not
    compared.

    `resize_on_device`: the DataLoader workers decode and crop; the resize and mean/std run on `device` in torch
    (for a GPU: less CPU work per image), giving the same bits as the CPU path.
    """
    settings = card_preprocessing(model)
    pipelines.pipeline_of(settings)  # a card naming an unknown interpolation stops here, before any image
    device = resolve_device(device)
    if amp is not None and amp not in AMP_DTYPES:
        raise UsageError(f"--amp {amp}: one of {', '.join(AMP_DTYPES)}")
    ranks = distributed.current()
    if against_tf is not None:
        from effconv.zoo.against_tf import check_runnable

        check_runnable(ranks.world_size, amp)
    found = find_images(data, labels_file, num_classes=model.num_classes, class_map=class_map)
    offset = 1 if model.num_classes == len(imagenet_classes()) + 1 else 0  # 1001 classes: background is 0
    images = _Images(found.files[:limit], tuple(label + offset for label in found.labels[:limit]), Path(data))
    if max(images.labels) >= model.num_classes:
        raise UsageError(f"label {max(images.labels)} does not exist in a model of {model.num_classes} classes")
    digest = _same_images_everywhere(images)
    log: PredictionsFile | None = None

    def resume() -> list[dict]:  # on rank 0 alone: the file is on its machine
        nonlocal log
        run = {"weights_sha256": _weights_digest(model), "images": len(images.names), "images_sha256": digest}
        log = PredictionsFile(predictions, {**run, "preprocessing": settings, "amp": amp})
        return log.resume(images.names)

    try:
        done = distributed.from_main(resume) if predictions is not None else []
        tally = _Tally(dict(zip(images.names, images.files, strict=True)))
        tally.add(done)
        finished = {row["path"] for row in done}
        todo = [i for i, name in enumerate(images.names) if name not in finished]
        report = progress if progress is not None and ranks.is_main else None
        if report:
            report(tally.done, len(images.names))

        def step(rows: list[dict]) -> None:  # the rows of every process's batch, on every process
            bad = next((row for row in rows if "error" in row), None)
            if bad is not None and not skip_bad:
                raise distributed.on_every_rank(UsageError(f"{bad['error']} (--skip-bad leaves unreadable images out)"))
            tally.add(rows)
            if log is not None:
                log.append(rows)
            if report:
                report(tally.done, len(images.names))

        loader = {"batch_size": batch_size, "num_workers": workers, "pin_memory": device.type == "cuda"}
        seconds, peak = _evaluate_share(
            model, images, todo, settings, loader, device, amp, step, against_tf, resize_on_device
        )
        if not tally.seen:
            error = f"none of the {len(images.files)} images could be read (first: {tally.skipped[0]['error']})"
            raise distributed.on_every_rank(UsageError(error))
        written = {"sha256": log.finish(images.names), "rows": tally.done} if log is not None else None
    finally:
        if log is not None:
            log.close()
    details = {
        "data": os.fspath(data),
        "layout": found.layout,
        "labels_file": None if labels_file is None else os.fspath(labels_file),
        "limit": limit,
        "batch_size": batch_size,
        "workers": workers,
        "device": str(device),
        "processes": ranks.world_size,
        "exact": amp is None,
        "amp": amp,
        "resize_on_device": resize_on_device,
        "evaluated": len(todo),
        "resumed": len(done),
        "skipped_count": len(tally.skipped),
        "skipped": tally.skipped,
        "preprocessing": settings,
        "effconv_version": __version__,
        **_device_details(device, amp, peak),
    }
    if predictions is not None:
        details["predictions"] = {"file": os.fspath(predictions), **(written or {})}
    if against_tf is not None:
        details["against_tf"] = against_tf.summary(resumed=len(done))
    top1, top5 = (100.0 * n / tally.seen for n in (tally.correct1, tally.correct5))
    return EvalResult(tally.seen, top1, top5, seconds, details, evaluated=len(todo))


@dataclass(frozen=True)
class _Images:
    files: tuple[Path, ...]
    labels: tuple[int, ...]
    root: Path

    @functools.cached_property
    def names(self) -> tuple[str, ...]:
        """The paths under the data folder, as the predictions file names them."""
        return tuple(path.relative_to(self.root).as_posix() for path in self.files)


def _evaluate_share(
    model, images: _Images, todo: list[int], settings, loader: dict, device, amp, step, against, resize_on_device
):
    """This process's share of the images `todo`, in step with the other processes; (seconds, peak GPU memory).

    Every process takes the same number of steps (the last ones of a smaller share are empty); after each,
    `step` gets the rows of every process's batch. `against` (an AgainstTF, or None) sees each batch's logits.
    `resize_on_device`: the workers decode and crop, the resize and mean/std run on `device`.
    """
    ranks = distributed.current()
    mine = distributed.share(todo, ranks)
    steps = -(-distributed.largest_share(len(todo), ranks.world_size) // loader["batch_size"])
    names = images.names
    files, labels = tuple(images.files[i] for i in mine), tuple(images.labels[i] for i in mine)
    dataset = ImageDataset(files, labels, settings, crops_only=resize_on_device)
    if resize_on_device:
        loader = {**loader, "collate_fn": collate_crops}
    inputs = functools.partial(_inputs, device, settings if resize_on_device else None)
    batches, position = iter(torch.utils.data.DataLoader(dataset, shuffle=False, **loader)), 0
    with _on_device(model, device, exact=amp is None) as model:
        start = time.perf_counter()
        with torch.inference_mode(), _autocast(device, amp):
            for _ in range(steps):
                batch = next(batches, None)
                rows = []
                if batch is not None:
                    count = len(batch[2])
                    chosen = mine[position : position + count]
                    watch = None
                    if against is not None:
                        files, labels = [images.files[i] for i in chosen], [images.labels[i] for i in chosen]
                        watch = functools.partial(against.add, files, labels)
                    rows = _rows(model, batch, [names[i] for i in chosen], inputs, watch)
                    position += count
                step([row for part in distributed.all_gather(rows) for row in part])
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return seconds, max(distributed.all_gather(peak), key=lambda p: p or 0)


def _device_details(device, amp: str | None, peak: int | None) -> dict:
    details = {}
    if amp is not None:
        details["note"] = (
            f"--amp {amp}: autocast to {AMP_DTYPES[amp]} on {device.type}, faster but not the exact float32 "
            "computation of the official evaluation; accuracy can differ a little"
        )
    if device.type == "cuda":
        details["tf32"] = False if amp is None else None  # the exact path turns TF32 off for convolutions
        details["peak_gpu_memory_bytes"] = peak  # the largest of any process
    return details


def _inputs(device: torch.device, on_device: dict | None, images, readable: torch.Tensor):
    """The model's input for the readable images of a batch, on `device`; and what `watch` is shown of it.

    `on_device` (the card's preprocessing): `images` are crops, resized there; else a preprocessed NCHW batch.
    """
    if on_device is not None:
        kept = [crop for crop, ok in zip(images, readable.tolist(), strict=True) if ok]
        with torch.autocast(device.type, enabled=False):  # the exact float32 resize, whatever --amp says
            x = torch.stack([pipelines.prepare_on_device(c.to(device, non_blocking=True), on_device) for c in kept])
        shown = x
    else:
        shown = images if readable.all() else images[readable]  # as loaded: pinned for the non-blocking copy
        x = shown.to(device, non_blocking=True)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)  # the layout of the weights, for cuDNN
    return x, shown


def _rows(model, batch, names: list[str], inputs, watch=None) -> list[dict]:
    """The per-image rows of one batch, in its order: top-5 classes and probabilities, or the reading error.

    `inputs(images, readable)` gives the model's input (see `_inputs`). `watch(readable, x, logits)`, when given,
    sees which images were read, their input and their logits.
    """
    images, target, errors = batch
    readable = torch.tensor([not error for error in errors], dtype=torch.bool)
    outputs = iter(())
    if readable.any():
        x, loaded = inputs(images, readable)
        logits = model(x).float()
        if watch is not None:
            watch(readable.tolist(), loaded, logits)
        top = logits.topk(min(TOP, logits.shape[1]), dim=1)
        probs = torch.softmax(logits, dim=1).gather(1, top.indices)
        found = torch.cat([top.indices.double(), probs.double(), top.values[:, :1].double()], dim=1).cpu()
        outputs = iter(found.tolist())
    rows = []
    for name, label, error in zip(names, target.tolist(), errors, strict=True):
        if error:
            rows.append({"path": name, "label": label, "error": error})
            continue
        values = next(outputs)
        k = (len(values) - 1) // 2
        rows.append(
            {
                "path": name,
                "label": label,
                "top5": [int(v) for v in values[:k]],
                "prob5": [rounded(v) for v in values[k : 2 * k]],
                "logit_max": rounded(values[-1]),
            }
        )
    return rows


@contextlib.contextmanager
def _on_device(model, device: torch.device, exact: bool):
    """The model on `device`; on CUDA channels-last, cuDNN autotuned, TF32 off on the exact path."""
    model = model.to(device)
    if device.type != "cuda":
        yield model
        return
    model = model.to(memory_format=torch.channels_last)
    flags = torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.benchmark = True
    if exact:  # TF32 rounds the inputs of every convolution to 10 bits of mantissa
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.cuda.reset_peak_memory_stats(device)
    try:
        yield model
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) = flags


def _autocast(device: torch.device, amp: str | None):
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


def _same_images_everywhere(images: _Images) -> str:
    """A digest of the image list and labels, checked to be the same in every process (each lists --data)."""
    listing = "\n".join(f"{name}\t{label}" for name, label in zip(images.names, images.labels, strict=True))
    digest = hashlib.sha256(listing.encode()).hexdigest()
    seen = distributed.all_gather((len(images.files), digest))
    if len(set(seen)) > 1:
        counts = ", ".join(f"rank {rank}: {count}" for rank, (count, _) in enumerate(seen))
        raise distributed.on_every_rank(
            distributed.DistributedError(
                f"the processes see different images under the data folder ({counts} images, or other labels): "
                "every machine needs the same files at the same path"
            )
        )
    return digest


def _weights_digest(model) -> str:
    """sha256 over the model's tensors (names, dtypes, shapes, values): which weights a predictions file holds."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
