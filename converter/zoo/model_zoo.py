"""`get_model`: an eval-mode model from a catalogue name (downloaded and converted once, then cached) or a file.

Cache layout under `effconv.zoo.download.cache_dir()` ($EFFCONV_CACHE): `checkpoints/` holds what `effconv download`
fetches, `models/NAME.SHA.pth` + `NAME.SHA.json` the converted weights and card, SHA being the first 16 hex digits
of the sha256 of the tarball they were converted from: a tarball fetched again with different contents
(`effconv download --force`) is converted again, never served from a stale conversion.
"""

from __future__ import annotations

import os
from pathlib import Path

from effconv.errors import UsageError
from effconv.zoo import catalogue
from effconv.zoo.download import archive_path, cache_dir, default_download_dir, download, recorded_sha256

_KEY_DIGITS = 16


def converted_path(name: str, source_sha256: str) -> Path:
    """Where the weights of catalogue entry `name` converted from the tarball of `source_sha256` are cached."""
    return cache_dir() / "models" / f"{catalogue.get_entry(name).name}.{source_sha256[:_KEY_DIGITS].lower()}.pth"


def get_model(
    name: str | os.PathLike,
    pretrained: bool | str | os.PathLike = True,
    *,
    num_classes: int | None = None,
    device: str | None = None,
    base_url: str | None = None,
    progress=None,
):
    """An eval-mode `EfficientNet`, in the manner of timm's `create_model` and mmpretrain's `get_model`.

    `name`: a catalogue name or alias (`effconv list`), an arch (`b0`, `efficientnet-b0`), or a converted
    file. `pretrained`: True, the catalogue's weights (downloaded and converted on first use, then cached) or
    the file `name`; False, random weights; a path, the converted file there (its arch must be `name`'s).
    A pretrained model carries its model card as `.card`. `num_classes`: a new, random classifier of that
    size when it differs from the weights' (`reset_classifier`; 0: features only). `device`: where the model
    goes (checked: an absent GPU is a UsageError).
    """
    from effconv.zoo.devices import resolve_device

    target = resolve_device(device) if device is not None else None  # checked before any download
    if pretrained is False:
        model = _random_model(name, 1000 if num_classes is None else num_classes)
    elif pretrained is True:
        model = _pretrained(name, base_url=base_url, progress=progress)
    else:
        model = _from_file(name, pretrained)
    if num_classes is not None and num_classes != model.num_classes:
        _replace_head(model, num_classes)
    return model if target is None else model.to(target)


def _arch_of(name: str | os.PathLike) -> str:
    from effconv.models import spec

    entry = catalogue.lookup(str(name))
    return entry.arch if entry is not None else spec.get_arch(str(name)).name


def _random_model(name: str | os.PathLike, num_classes: int):
    from effconv.models import create_model

    return create_model(_arch_of(name), num_classes)


def _from_file(name: str | os.PathLike, path: str | os.PathLike):
    from effconv.output.loading import load

    model = load(Path(path).expanduser())
    wanted = _arch_of(name)
    if model.card.arch != wanted:
        raise UsageError(f"pretrained={os.fspath(path)} holds {model.card.arch} weights, but {name} is {wanted}")
    return model


def _replace_head(model, num_classes: int) -> None:
    """A new classifier; the card, when there is one, says so (the backbone's weights are still its)."""
    import dataclasses

    model.reset_classifier(num_classes)
    card = getattr(model, "card", None)
    if card is not None:
        model.card = dataclasses.replace(card, num_classes=num_classes, extra={**card.extra, "classifier": "reset"})


def _pretrained(name_or_path: str | os.PathLike, *, base_url: str | None = None, progress=None):
    """The model of a converted `X.pth` (card `X.json` beside it) or of a catalogue name or alias
    (`effconv list`), which is downloaded and converted on first use and read from the cache after.
    """
    from effconv.output.loading import load

    path = Path(name_or_path).expanduser()
    if path.is_file():
        return load(path)
    entry = catalogue.lookup(str(name_or_path))
    if entry is None:
        raise UsageError(f"{name_or_path} is neither a converted .pth file nor a catalogue name (`effconv list`)")
    recorded = recorded_sha256(archive_path(entry, default_download_dir()))  # no re-hashing of a cached model
    if recorded and converted_path(entry.name, recorded).is_file():
        return load(converted_path(entry.name, recorded))
    got = download(entry, base_url=base_url, progress=progress)  # checks what is there, fetches what is not
    out = converted_path(entry.name, got.sha256)
    if not out.is_file():
        _convert_into_cache(entry, got.checkpoint_dir, got.sha256, out)
    return load(out)


def _convert_into_cache(entry: catalogue.CatalogueEntry, source: Path, source_sha256: str, out: Path) -> None:
    from effconv.convert import convert_checkpoint
    from effconv.output.artifact import write_artifact

    result = convert_checkpoint(source, variant=entry.variant, image_size=entry.image_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    card = result.card.to_json()
    card["source"] = {**card["source"], "archive": {"file": entry.file, "sha256": source_sha256}}
    write_artifact(result.state_dict, {**card, "catalogue_name": entry.name}, out, force=True)
