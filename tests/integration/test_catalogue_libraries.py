"""The catalogue's timm tags and mmpretrain names against the REAL libraries (in .venv-timm).

tests/support/catalogue_side.py asks timm and mmpretrain; this judges: every `tf_...` alias is a pretrained tag
timm has, timm's model for it has effconv's parameter count, and a row's name is mmpretrain's exactly where the
catalogue says mmpretrain ports the checkpoint. A missing .venv-timm fails.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from effconv.models.efficientnet import model_tensor_shapes
from effconv.models.spec import family_of
from effconv.zoo import catalogue

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TIMM_PYTHON = PROJECT_ROOT / ".venv-timm" / "bin" / "python"
CATALOGUE_SIDE = PROJECT_ROOT / "tests" / "support" / "catalogue_side.py"


@pytest.fixture(scope="module")
def libraries(tmp_path_factory) -> dict:
    if not TIMM_PYTHON.is_file():
        pytest.fail(f"{TIMM_PYTHON} missing: run scripts/bootstrap.sh (CI does) to create .venv-timm")
    out = tmp_path_factory.mktemp("catalogue_side") / "libraries.json"
    subprocess.run(
        [str(TIMM_PYTHON), str(CATALOGUE_SIDE), str(catalogue.CATALOGUE_PATH), str(out)],
        check=True,
        timeout=600,
    )
    return json.loads(out.read_text())


def mmpretrain_ports(entry: catalogue.CatalogueEntry) -> bool:
    """Where the catalogue's `fields.name` says its name is mmpretrain's: the B family but its RandAugment pair,
    and EfficientNetV2 but the -21k and -21k-ft1k releases of b0-b3."""
    family = family_of(entry.arch).name
    if family == "efficientnet":
        return entry.variant != "randaug"
    if family == "v2":
        return entry.variant == "standard" or entry.arch not in ("v2-b0", "v2-b1", "v2-b2", "v2-b3")
    return False


def test_every_timm_alias_is_a_timm_tag_with_our_parameter_count(libraries):
    checked = 0
    for entry in catalogue.entries():
        for alias in (a for a in entry.aliases if a.startswith("tf_")):
            got = libraries["timm"][alias]
            assert got["known"], f"{entry.name}: timm has no pretrained tag {alias}"
            # timm's EdgeTPU ports drop the background class (1000 of the release's 1001 outputs)
            expected_classes = 1000 if family_of(entry.arch).name == "edgetpu" else entry.num_classes
            assert got["classes"] == expected_classes, alias
            assert got["parameters"] == model_tensor_shapes(entry.arch, got["classes"])[1], alias
            checked += 1
    assert checked == 63  # every row but EfficientNetV2 b0-b2's -21k and -21k-ft1k (timm has b3's only)


def test_names_are_mmpretrains_where_it_ports_the_checkpoint(libraries):
    for entry in catalogue.entries():
        assert libraries["mmpretrain"][entry.name] == mmpretrain_ports(entry), entry.name
    assert sum(libraries["mmpretrain"].values()) == 33 + 15
