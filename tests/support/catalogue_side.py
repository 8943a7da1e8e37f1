"""Runs in .venv-timm, never in the main venv: what timm and mmpretrain say about the catalogue's names.

    .venv-timm/bin/python tests/support/catalogue_side.py CATALOGUE.json OUT.json

For every timm-style alias (`tf_...`): whether timm has that pretrained tag, and the parameters and classes of
timm's model for it (built on the meta device: no memory, no download). For every row name: whether mmpretrain
has a model of that name. Imports nothing from effconv: tests/integration/test_catalogue_libraries.py judges it.
"""

from __future__ import annotations

import json
import sys
import warnings

warnings.filterwarnings("ignore")  # mmcv-lite warns about the compiled ops it lacks


def main(catalogue_path: str, out_path: str) -> None:
    import mmpretrain
    import timm
    import torch

    rows = json.loads(open(catalogue_path).read())["models"]
    tags = set(timm.list_pretrained())
    timm_side = {}
    for row in rows:
        for alias in (a for a in row["aliases"] if a.startswith("tf_")):
            entry = {"known": alias in tags}
            if entry["known"]:
                with torch.device("meta"):
                    model = timm.create_model(alias, pretrained=False)
                entry |= {"parameters": sum(p.numel() for p in model.parameters()), "classes": model.num_classes}
            timm_side[alias] = entry
    models = set(mmpretrain.list_models())
    result = {"timm": timm_side, "mmpretrain": {row["name"]: row["name"] in models for row in rows}}
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
