"""`get_model`: an eval-mode model from a catalogue name (downloaded and converted once, then cached) or a file.

Cache layout under `effconv.zoo.download.cache_dir()` ($EFFCONV_CACHE): `checkpoints/` holds what `effconv download`
fetches, `models/NAME.pth` + `NAME.json` the converted weights and card.
"""

from __future__ import annotations

import os
from pathlib import Path

from effconv.errors import UsageError
from effconv.zoo import catalogue
from effconv.zoo.download import cache_dir, download


def converted_path(name: str) -> Path:
    """Where the converted weights of catalogue entry `name` are cached."""
    return cache_dir() / "models" / f"{catalogue.get_entry(name).name}.pth"


def get_model(name_or_path: str | os.PathLike, *, base_url: str | None = None, progress=None):
    """An eval-mode `EfficientNet` with its model card as `.card`.

    `name_or_path`: a converted `X.pth` (card `X.json` beside it) or a catalogue name or alias
    (`effconv list`), which is downloaded and converted on first use and read from the cache after.
    """
    from effconv.output.loading import load

    path = Path(name_or_path).expanduser()
    if path.is_file():
        return load(path)
    entry = catalogue.lookup(str(name_or_path))
    if entry is None:
        raise UsageError(f"{name_or_path} is neither a converted .pth file nor a catalogue name (`effconv list`)")
    out = converted_path(entry.name)
    if not out.is_file():
        _convert_into_cache(entry, out, base_url, progress)
    return load(out)


def _convert_into_cache(entry: catalogue.CatalogueEntry, out: Path, base_url: str | None, progress) -> None:
    from effconv.convert import convert_checkpoint
    from effconv.output.artifact import write_artifact

    source = download(entry, base_url=base_url, progress=progress).checkpoint_dir  # a no-op once downloaded
    result = convert_checkpoint(source, variant=entry.variant, image_size=entry.image_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    card = {**result.card, "catalogue_name": entry.name}
    write_artifact(result.state_dict, card, out, force=True)
