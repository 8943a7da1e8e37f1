"""Every catalogue row against the architecture table, the variant rules and the official file names."""

from __future__ import annotations

import json
import math
from collections import Counter
from functools import cache

import pytest
import torch

from effconv import variants
from effconv.errors import UsageError
from effconv.models import create_model, spec
from effconv.zoo import catalogue
from tests.support.helpers import run_cli

ENTRIES = catalogue.entries()
OFFICIAL_BASE = "https://storage.googleapis.com/cloud-tpu-checkpoints/efficientnet/"
FOLDER_OF = {"standard": "ckpts", "aa": "ckptsaug", "advprop": "advprop", "noisystudent": "noisystudent"}
# Releases per family, from the official READMEs: tensorflow/tpu models/official/efficientnet/README.md and its
# lite/, edgetpu/, condconv/ READMEs; google/automl efficientnetv2/README.md (b0-b3, S, M, L 1k; every size's
# -21k and -21k-ft1k, XL only those two).
FAMILY_ROWS = {"efficientnet": 35, "lite": 5, "edgetpu": 3, "condconv": 3, "v2": 23}
# The released heads: EdgeTPU trains with label 0 = background (its README: --include_background_label), the
# EfficientNetV2 ImageNet-21k releases have ImageNet-21k's 21,843 classes (automl datasets.ImageNet21kInput).
CLASSES_OF_FAMILY = {"edgetpu": 1001}
CLASSES_OF_VARIANT = {"in21k": 21843}
# The official file of each family's releases, from the official name (`efficientnet-edgetpu-S`).
V2_SUFFIX = {"standard": "", "in21k": "-21k", "in21k-ft1k": "-21k-ft1k"}
OFFICIAL_FILE = {
    "lite": lambda e: f"lite/{spec.official_name(e.arch)}.tar.gz",
    "edgetpu": lambda e: f"{spec.official_name(e.arch)}.tar.gz",  # at the top of the bucket folder, not edgetpu/
    "condconv": lambda e: f"condconv/{spec.official_name(e.arch)}.tar.gz",
    "v2": lambda e: f"v2/{spec.official_name(e.arch)}{V2_SUFFIX[e.variant]}.tgz",
}
# timm's `tf_` model of each arch outside the B family (its CondConv B1-8e is the official b0-8e-depth:
# width 1.0, depth 1.1, 8 experts), and its pretrained tag of each variant.
TIMM_MODEL = {
    **{f"lite{i}": f"tf_efficientnet_lite{i}" for i in range(5)},
    **{f"edgetpu-{s}": f"tf_efficientnet_e{s}" for s in "sml"},
    "condconv-b0-4e": "tf_efficientnet_cc_b0_4e",
    "condconv-b0-8e": "tf_efficientnet_cc_b0_8e",
    "condconv-b0-8e-depth": "tf_efficientnet_cc_b1_8e",
    **{f"v2-{s}": f"tf_efficientnetv2_{s}" for s in ("b0", "b1", "b2", "b3", "s", "m", "l", "xl")},
}
TIMM_TAG = {"standard": "in1k", "in21k": "in21k", "in21k-ft1k": "in21k_ft_in1k"}
NAME_SUFFIX = {"standard": "_3rdparty_in1k", "in21k": "_3rdparty_in21k", "in21k-ft1k": "_in21k-pre_3rdparty_in1k"}
NO_TIMM_TAG = {(f"v2-b{i}", v) for i in range(3) for v in ("in21k", "in21k-ft1k")}  # timm has b3's only


def family(entry: catalogue.CatalogueEntry) -> str:
    return spec.family_of(entry.arch).name


@cache
def built_parameters(arch: str, num_classes: int) -> int:
    """Parameters of effconv's own model with this head, built without memory (meta tensors)."""
    with torch.device("meta"):
        model = create_model(arch, num_classes)
    return sum(p.numel() for p in model.parameters())


def conv_macs(arch: str, size: int, num_classes: int = 1000) -> int:
    """Multiply-adds of the convolutions and the dense layer at `size` px, from the architecture table alone."""
    side = math.ceil(size / 2)
    total = side * side * spec.stem_channels(arch) * 3 * 9
    for b in spec.blocks(arch):
        if b.kind in ("fused_mbconv", "edge_residual"):  # k x k conv at the block stride, then 1x1 project
            side = math.ceil(side / b.stride)
            if b.has_expand or b.kind == "edge_residual":
                total += side * side * b.mid_channels * (b.kernel * b.kernel * b.in_channels + b.out_channels)
            else:  # fused without expansion: the k x k conv alone
                total += side * side * b.kernel * b.kernel * b.in_channels * b.out_channels
            continue
        if b.has_expand:
            total += side * side * b.mid_channels * b.in_channels
        side = math.ceil(side / b.stride)
        total += side * side * b.mid_channels * (b.kernel * b.kernel + b.out_channels)
        total += 2 * b.mid_channels * b.se_channels
        if b.experts:  # CondConv: routing, and mixing each conv's experts into one kernel per example
            total += b.in_channels * b.experts
            total += b.experts * b.mid_channels * (b.in_channels * b.has_expand + b.kernel * b.kernel + b.out_channels)
    head = spec.head_channels(arch)
    return total + side * side * head * spec.blocks(arch)[-1].out_channels + num_classes * head


def test_every_official_checkpoint_once():
    assert len(ENTRIES) == 69
    assert Counter(family(e) for e in ENTRIES) == FAMILY_ROWS
    per_variant = Counter(e.variant for e in ENTRIES)
    assert per_variant == {
        "standard": 6 + 5 + 3 + 3 + 7,  # B b0-b5, Lite, EdgeTPU, CondConv, EfficientNetV2 b0-b3 S M L
        "aa": 8,
        "advprop": 9,
        "noisystudent": 10,
        "randaug": 2,
        "in21k": 8,
        "in21k-ft1k": 8,
    }
    assert len({e.file for e in ENTRIES}) == len(ENTRIES)
    assert {e.arch for e in ENTRIES} == set(spec.ARCH_NAMES), "an arch without a released checkpoint"


def test_names_and_aliases_are_unique_across_the_catalogue():
    keys = [k.lower() for e in ENTRIES for k in (e.name, *e.aliases)]
    assert len(keys) == len(set(keys)), [k for k, n in Counter(keys).items() if n > 1]


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_row_agrees_with_architecture_and_variant_rules(entry):
    assert entry.arch in spec.ARCH_NAMES
    expected_classes = CLASSES_OF_VARIANT.get(entry.variant, CLASSES_OF_FAMILY.get(family(entry), 1000))
    assert entry.num_classes == expected_classes
    assert entry.parameters == built_parameters(entry.arch, entry.num_classes)
    # The native size, but where the release says otherwise: the L2 fine-tuned at 475 px, and the EfficientNetV2
    # -21k releases, trained and evaluated at 224 px by the official ImageNet21k config whatever the size.
    native = spec.get_arch(entry.arch).resolution
    if entry.file.endswith("l2_475.tar.gz"):
        assert entry.image_size == 475
    elif entry.variant == "in21k":
        assert entry.image_size == 224
    else:
        assert entry.image_size == native
    assert entry.image_size == variants.detect_image_size(entry.arch, entry.file)
    # What `effconv convert` writes into the card for this row is what the row says.
    card = variants.preprocessing(entry.variant, entry.image_size, entry.arch)
    assert list(entry.mean) == card["mean"] and list(entry.std) == card["std"]
    assert entry.crop_padding == card["crop_padding"]
    if entry.variant == "standard":  # the family's (or size's) own official pipeline
        own = spec.preprocessing_of(entry.arch)
        assert entry.mean == own.mean and entry.std == own.std
    expected_variant = None if entry.variant == "standard" else entry.variant
    assert variants.detect_variant(entry.file) == expected_variant


def test_the_official_pipelines_of_the_new_families():
    """The normalisation each official evaluator applies, spelled out (not read back from effconv's tables)."""
    inception = ([127.0] * 3, [128.0] * 3)  # Lite, EdgeTPU, CondConv builders' MEAN_RGB / STDDEV_RGB
    by_family = {"lite": inception, "edgetpu": inception, "condconv": inception}
    for e in ENTRIES:
        if family(e) in by_family:
            assert (list(e.mean), list(e.std)) == by_family[family(e)], e.name
    v2 = {e.name: e for e in ENTRIES if family(e) == "v2"}
    imagenet = ([123.675, 116.28, 103.53], [58.395, 57.12, 57.375])
    assert (list(v2["efficientnetv2-b0_3rdparty_in1k"].mean), list(v2["efficientnetv2-b0_3rdparty_in1k"].std)) == (
        imagenet
    )  # b0-b3 1k: the V1 pipeline (augname effnetv1_autoaug)
    assert v2["efficientnetv2-s_3rdparty_in1k"].mean == (128.0,) * 3  # preprocess_for_eval: (x - 128) / 128
    assert v2["efficientnetv2-b0_3rdparty_in21k"].mean == (128.0,) * 3  # ImageNet21k: augname None, even b0-b3
    assert v2["efficientnetv2-b0_in21k-pre_3rdparty_in1k"].std == (127.5,) * 3  # ImagenetFt: (x / 255 - 0.5) / 0.5
    card = variants.preprocessing("in21k-ft1k", 224, "v2-b0")
    assert card["crop"] == "none" and card["interpolation"] == "bilinear-tf2"
    card = variants.preprocessing("in21k", 224, "v2-xl")
    assert card["crop"] == "center" and card["crop_fraction"] == 0.875 and card["interpolation"] == "bilinear-tf2"


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_row_names_the_official_file(entry):
    arch = entry.arch
    if family(entry) != "efficientnet":
        assert entry.file == OFFICIAL_FILE[family(entry)](entry)
    elif entry.variant == "randaug":
        assert entry.file == f"randaug/efficientnet-{arch}-randaug.tar.gz"
    elif entry.variant == "noisystudent":
        suffix = "_475" if entry.image_size == 475 else ""
        assert entry.file == f"noisystudent/noisy_student_efficientnet-{arch}{suffix}.tar.gz"
    else:
        assert entry.file == f"{FOLDER_OF[entry.variant]}/efficientnet-{arch}.tar.gz"
    assert entry.url() == OFFICIAL_BASE + entry.file
    assert entry.aliases[-1] == entry.stem, "the official path without its extension is the last alias"
    if family(entry) == "efficientnet":
        assert entry.name.startswith(f"efficientnet-{arch}_") and entry.aliases[0].startswith(
            f"tf_efficientnet_{arch}."
        )
        return
    if (arch, entry.variant) in NO_TIMM_TAG:
        assert entry.aliases == (entry.stem,)
    else:
        assert entry.aliases == (f"{TIMM_MODEL[arch]}.{TIMM_TAG[entry.variant]}", entry.stem)
    # mmpretrain's names (its EfficientNetV2 ports), or effconv's in their style: the official name, with
    # mmpretrain's arch names for EdgeTPU (es/em/el, as its configs).
    base = "efficientnet-e" + arch.removeprefix("edgetpu-") if family(entry) == "edgetpu" else spec.official_name(arch)
    assert entry.name == base + NAME_SUFFIX[entry.variant]


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_published_figures_are_plausible(entry):
    if entry.flops is not None:
        # mmpretrain's counter adds BN, activations and pooling to the conv multiply-adds: 2-10 % more for the B
        # family (this catches the swapped L2 figures of the seed table, off by 2.8x), up to 30 % for
        # EfficientNetV2, whose first, fused stages run at high resolution; the official READMEs' MAdds of Lite
        # and CondConv are within 1-6 %.
        ratio = entry.flops / conv_macs(entry.arch, entry.image_size, entry.num_classes)
        assert 1.0 < ratio < (1.1 if family(entry) == "efficientnet" else 1.3)
    else:
        assert family(entry) == "edgetpu" or (entry.variant == "in21k" and entry.arch.startswith("v2-b"))
    if entry.top1 is not None:
        assert 70 < entry.top1 < entry.top5 < 100
    if entry.top1 is not None and entry.official_top1 is not None:
        assert abs(entry.top1 - entry.official_top1) < 1.5
    if entry.official_top1 is not None:
        assert 70 < entry.official_top1 < 90
    if entry.num_classes != 1000 and entry.num_classes != 1001:  # ImageNet-21k: no ImageNet-1k figure
        assert entry.top1 is entry.top5 is entry.official_top1 is None
    assert (entry.top1 is None) == (entry.top5 is None)


def test_l2_flops_grow_with_resolution():
    l2 = {e.image_size: e.flops for e in ENTRIES if e.arch == "l2"}
    assert l2[800] == 484_984_099_280 and l2[475] == 174_203_533_416


def test_lookup_by_name_and_alias():
    entry = catalogue.get_entry("TF_EfficientNet_B0.AP_in1k")
    assert entry.name == "efficientnet-b0_3rdparty_8xb32-aa-advprop_in1k" and entry.variant == "advprop"
    assert catalogue.get_entry("noisystudent/noisy_student_efficientnet-l2_475").image_size == 475
    assert catalogue.lookup("efficientnet-b9") is None
    with pytest.raises(UsageError, match="did you mean"):
        catalogue.get_entry("b0_3rdparty_8xb32-aa")
    edgetpu = catalogue.get_entry("efficientnet-edgetpu-S")  # the official name, as the README's ${MODEL}
    assert edgetpu is catalogue.get_entry("tf_efficientnet_es.in1k") and edgetpu.num_classes == 1001
    v2 = catalogue.get_entry("v2/efficientnetv2-xl-21k")
    assert (v2.arch, v2.variant, v2.num_classes, v2.image_size, v2.stem) == (
        "v2-xl",
        "in21k",
        21843,
        224,
        "v2/efficientnetv2-xl-21k",
    )


def test_a_catalogue_without_num_classes_reads_as_1000(monkeypatch, tmp_path):
    """Rows written before the field existed (a mirror's own catalogue) stay valid: 1000 classes."""
    doc = json.loads(catalogue.CATALOGUE_PATH.read_text())
    row = dict(doc["models"][0])
    del row["num_classes"]
    path = tmp_path / "catalogue.json"
    path.write_text(json.dumps({**doc, "models": [row]}))
    monkeypatch.setattr(catalogue, "CATALOGUE_PATH", path)
    for cached in (catalogue._document, catalogue.entries, catalogue._by_key):
        cached.cache_clear()
    try:
        (entry,) = catalogue.entries()
        assert entry.num_classes == 1000 and entry.name == row["name"]
    finally:
        monkeypatch.undo()
        for cached in (catalogue._document, catalogue.entries, catalogue._by_key):
            cached.cache_clear()


def test_cli_list_filters_and_json():
    result = run_cli("list", "--arch", "b7")
    assert result.exit_code == 0
    lines = result.stdout.strip().splitlines()
    assert lines[0].split()[:5] == ["name", "alias", "variant", "size", "classes"] and len(lines) == 1 + 4
    result = run_cli("list", "--variant", "advprop", "--json")
    rows = json.loads(result.stdout)
    assert [r["arch"] for r in rows] == [f"b{i}" for i in range(9)]
    assert rows[0]["url"] == OFFICIAL_BASE + "advprop/efficientnet-b0.tar.gz" and rows[0]["mean"] == [127.5] * 3
    assert json.loads(run_cli("list", "--arch", "b8", "--variant", "aa", "--json").stdout) == []


def test_cli_list_shows_the_new_families():
    result = run_cli("list", "--arch", "v2-s")
    assert result.exit_code == 0
    lines = result.stdout.strip().splitlines()[1:]
    assert [line.split()[:5] for line in lines] == [
        ["efficientnetv2-s_3rdparty_in1k", "tf_efficientnetv2_s.in1k", "standard", "384", "1000"],
        ["efficientnetv2-s_in21k-pre_3rdparty_in1k", "tf_efficientnetv2_s.in21k_ft_in1k", "in21k-ft1k", "384", "1000"],
        ["efficientnetv2-s_3rdparty_in21k", "tf_efficientnetv2_s.in21k", "in21k", "224", "21843"],
    ]
    edgetpu = run_cli("list", "--arch", "edgetpu-s").stdout.strip().splitlines()[1].split()
    assert edgetpu[4] == "1001" and edgetpu[6] == "-"  # no published FLOPs
    rows = json.loads(run_cli("list", "--variant", "in21k", "--json").stdout)
    assert [r["url"] for r in rows][-1] == OFFICIAL_BASE + "v2/efficientnetv2-xl-21k.tgz"
    assert all(r["num_classes"] == 21843 and r["top1"] is None for r in rows)


def test_list_says_why_the_sha256_is_null():
    """No row pins a sha256 (no network where the catalogue was written): list says so rather than print null."""
    assert all(e.sha256 is None for e in catalogue.entries())
    result = run_cli("list", "--arch", "b0")
    note = result.stderr.strip()
    assert note.startswith("sha256: not pinned for any of these checkpoints") and "download` records" in note
    assert "null" not in result.output and len(result.stdout.strip().splitlines()) == 1 + 4
    rows = json.loads(run_cli("list", "--arch", "b0", "--json").stdout)
    assert all(r["sha256"] is None and r["sha256_note"].startswith("not pinned") for r in rows)
