"""Issue 12: the timm and mmpretrain layouts of Lite, EdgeTPU, CondConv and EfficientNetV2, against the REAL libraries.

tests/support/library_side.py runs in .venv-timm: the official-lite0, -edgetpu-s, -condconv-b0-4e and -v2-b0
fixtures (written by the official code, with its logits), a synthetic edgetpu-m (two stage-0 blocks, the second
without a shortcut; 1001 classes) and a synthetic v2-s (two stage-0 fused blocks without expansion, both with a
shortcut; 10 classes) are converted, loaded strictly into timm's `tf_efficientnet_lite0` / `_es` / `_em` /
`_cc_b0_4e`, `tf_efficientnetv2_b0` / `_s` and mmpretrain's `EfficientNet` (arch `es` / `em`, ReLU) and
`EfficientNetV2` (arch `b0` / `s`), and run; the cards' own create lines are run too, and both libraries list
their keys and shapes for every size. Layouts a library cannot hold (Lite, EdgeTPU-L and CondConv in
mmpretrain, all four families in transformers) are refused before any tensor is read.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from effconv.errors import UsageError
from effconv.mappings import engine, hf, mmpretrain, timm
from effconv.mappings.layouts import LAYOUT_CHECKS, get_layout
from effconv.models import load, spec
from effconv.models.efficientnet import model_tensor_shapes
from tests.conftest import PROJECT_ROOT
from tests.support.families import registered
from tests.support.helpers import assert_close, nchw, run_cli, run_library_side

TIMM_PYTHON = PROJECT_ROOT / ".venv-timm" / "bin" / "python"
FIXTURES = PROJECT_ROOT.parent / "shared" / "fixtures"


def _archs(family: str) -> tuple[str, ...]:
    return tuple(a for a in spec.ARCH_NAMES if spec.get_arch(a).family == family)


LITE, EDGETPU, CONDCONV, V2 = _archs("lite"), _archs("edgetpu"), _archs("condconv"), _archs("v2")
RELU = {"type": "ReLU"}
OFFICIAL = ("official-lite0", "official-edgetpu-s", "official-condconv-b0-4e", "official-v2-b0")
# synthetic source -> (arch, classes, calibration size), written by `effconv synth`'s writer; v2-s calibrated at
# 64 px has its 15-block last stage at 2 x 2 and explodes (logits ~3e3), at 128 px it stays sane at 64/65 px
SYNTH = {"synth-edgetpu-m": ("edgetpu-m", 1001, 64), "synth-v2-s": ("v2-s", 10, 128)}
# file name -> (source, layout)
FILES = {
    "lite0-timm.pth": ("official-lite0", "timm"),
    "edgetpu-s-timm.safetensors": ("official-edgetpu-s", "timm"),
    "edgetpu-s-mm.pth": ("official-edgetpu-s", "mmpretrain"),
    "edgetpu-m-timm.pth": ("synth-edgetpu-m", "timm"),
    "edgetpu-m-mm.safetensors": ("synth-edgetpu-m", "mmpretrain"),
    "condconv-b0-4e-timm.safetensors": ("official-condconv-b0-4e", "timm"),
    "v2-b0-timm.pth": ("official-v2-b0", "timm"),
    "v2-b0-mm.pth": ("official-v2-b0", "mmpretrain"),
    "v2-s-timm.safetensors": ("synth-v2-s", "timm"),
    "v2-s-mm.pth": ("synth-v2-s", "mmpretrain"),
}
SYNTH_SIZES = (64, 65)  # small, and odd: TF 'SAME' pads symmetrically at the stem there
# Cards of the EfficientNetV2 releases timm has a tag for, built without weights (only the data config counts):
# name -> (arch, variant, input size)
V2_META_CARDS = {
    "v2-b3-in21k": ("v2-b3", "in21k", 224),
    "v2-s-in21k-ft1k": ("v2-s", "in21k-ft1k", 384),
    "v2-l-standard": ("v2-l", "standard", 480),
    "v2-xl-in21k": ("v2-xl", "in21k", 224),
}


def _fixture(name: str):
    path = FIXTURES / name
    if not (path / "ckpt" / "checkpoint").is_file():
        pytest.fail(f"ground-truth fixture missing: {path} (../shared must sit beside the project)")
    return path


def _model(library: str, card: dict):
    """What the library builds for the card: timm's model name, or mmpretrain's ImageClassifier (backbone, neck)."""
    if library == "timm":
        return card["timm"]["model_name"]
    model = card["mmpretrain"]["model"]
    return {"backbone": model["backbone"], "neck": model["neck"]}


@pytest.fixture(scope="module")
def family_run(tmp_path_factory):
    """Every file converted, what the real libraries make of it, their keys for every size, the cards' lines."""
    from effconv.parity.synth import write_synthetic_checkpoint

    if not TIMM_PYTHON.is_file():
        pytest.fail(f"{TIMM_PYTHON} missing: run scripts/bootstrap.sh (CI does) to create .venv-timm")
    tmp = tmp_path_factory.mktemp("families")
    for source, (arch, classes, calibration) in SYNTH.items():
        write_synthetic_checkpoint(arch, tmp / source, num_classes=classes, ema_only=True, calibration_size=calibration)
    inputs, oracles = {}, {}
    for name in OFFICIAL:
        with np.load(_fixture(name) / "oracle.npz") as data:
            oracles[name] = {k: data[k] for k in data.files}
        for key in ("x", "x_odd"):
            inputs[f"{name}-{key}"] = nchw(oracles[name][key]).numpy()
    for source in SYNTH:
        for size in SYNTH_SIZES:
            x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
            inputs[f"{source}-{size}"] = x.numpy()
    for key, x in inputs.items():
        np.savez(tmp / f"{key}.npz", x=x)
    cards, loads, card_jobs = {}, [], []
    for file, (source, layout) in FILES.items():
        src = tmp / source if source in SYNTH else _fixture(source) / "ckpt"
        out = tmp / file
        result = run_cli("convert", "--src", src, "--out", out, "--layout", layout, "--variant", "standard", "-q")
        assert result.exit_code == 0, result.output
        card = cards[file] = json.loads(out.with_suffix(".json").read_text())
        library = card["layout"]
        keys = ("x", "x_odd") if source not in SYNTH else SYNTH_SIZES
        for key in keys:
            job_input = tmp / f"{source}-{key}.npz"
            loads.append(
                {
                    "name": f"{file}@{key}",
                    "library": library,
                    "arch": card["arch"],
                    "num_classes": card["num_classes"],
                    "head_channels": spec.head_channels(card["arch"]),
                    "weights": str(out),
                    "model": _model(library, card),
                    "input": str(job_input),
                }
            )
        section = card[library]
        line = section["create_safetensors"] if file.endswith(".safetensors") and library == "mmpretrain" else None
        line = line or f"model = {section['create']}"
        card_jobs.append(
            {"name": file, "library": library, "statements": line, "weights": str(out), "input": str(job_input)}
        )
    for name, (arch, variant, size) in V2_META_CARDS.items():
        card = cards[name] = _card(arch, 1000, variant, size)
        card["layout"] = "timm"
        card["timm"] = timm.card_section(card)
        line = card["timm"]["create"].replace("pretrained=True", "pretrained=False")
        card_jobs.append({"name": name, "library": "timm", "statements": f"model = {line}", "weights": None})
    el = {"backbone": {"type": "EfficientNet", "arch": "el", "act_cfg": RELU}}  # refused by effconv, listed here
    mm_archs = ("edgetpu-s", "edgetpu-m", *V2)
    mm_models = {a: _model("mmpretrain", {"mmpretrain": mmpretrain.card_section(_card(a))}) for a in mm_archs}
    timm_archs = (*LITE, *EDGETPU, *CONDCONV, *V2)
    keys = {
        "archs": {"timm": list(timm_archs), "mmpretrain": [*EDGETPU, *V2]},
        "libraries": ["timm", "mmpretrain"],
        "head_channels": {a: spec.head_channels(a) for a in timm_archs},
        "models": {
            "timm": {a: timm.model_name(a) for a in timm_archs},
            "mmpretrain": {**mm_models, "edgetpu-l": el},
        },
    }
    jobs = {"input": str(tmp / "synth-edgetpu-m-64.npz"), "load": loads, "keys": keys, "cards": card_jobs}
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    output = run_library_side(tmp)
    results = {}
    for npz in ("logits", "card_logits"):
        with np.load(tmp / f"{npz}.npz") as data:
            results[npz] = {k: data[k] for k in data.files}
    return {
        "dir": tmp,
        "cards": cards,
        "inputs": inputs,
        "oracles": oracles,
        "logits": results["logits"],
        "card_logits": results["card_logits"],
        "keys": json.loads((tmp / "keys.json").read_text()),
        "configs": json.loads((tmp / "cards.json").read_text()),
        "names": json.loads((tmp / "model_names.json").read_text()),
        "output": output,
        "effconv": {},  # file -> effconv's model of it; (file, input) -> its logits
    }


def _card(arch: str, num_classes: int = 1001, variant: str = "standard", size: int | None = None) -> dict:
    from effconv.variants import preprocessing

    size = size or spec.get_arch(arch).resolution
    return {"arch": arch, "variant": variant, "image_size": size, "num_classes": num_classes,
            "preprocessing": preprocessing(variant, size, arch)}  # fmt: skip


def _effconv_logits(run, file: str, key) -> np.ndarray:
    """effconv's own model, loaded from the converted file (`effconv.models.load`), on the same input."""
    if (file, key) not in run["effconv"]:
        source = FILES[file][0]
        if file not in run["effconv"]:
            run["effconv"][file] = load(run["dir"] / file)
        with torch.no_grad():
            x = torch.from_numpy(run["inputs"][f"{source}-{key}"])
            run["effconv"][file, key] = run["effconv"][file](x).numpy()
    return run["effconv"][file, key]


@pytest.mark.parametrize("file", [f for f, (source, _) in FILES.items() if source not in SYNTH])
@pytest.mark.parametrize(("key", "reference"), [("x", "logits_ema"), ("x_odd", "logits_ema_odd")])
def test_real_library_reproduces_the_official_logits(family_run, file, key, reference):
    """The official fixtures at the native size (224) and an odd one (225): the library agrees with the
    official code's logits, and with effconv's own model loaded from the same file."""
    source, layout = FILES[file]
    got = family_run["logits"][f"{file}@{key}"]
    official = family_run["oracles"][source][reference]
    diff, limit = assert_close(got, official, what=f"{file} in {layout} vs official {reference}")
    print(f"{file} ({layout}) vs official {reference}: max |diff| {diff:.3g} (limit {limit:.3g})")
    assert (got.argmax(1) == official.argmax(1)).all()
    assert_close(got, _effconv_logits(family_run, file, key), what=f"{file} in {layout} vs effconv.models.load")


@pytest.mark.parametrize("file", [f for f, (source, _) in FILES.items() if source in SYNTH])
@pytest.mark.parametrize("size", SYNTH_SIZES)
def test_real_library_matches_effconv_on_synthetic_sizes(family_run, file, size):
    """edgetpu-m: stage 0 has two edge-residual blocks, the second 24 -> 24 without a shortcut (noskip).
    v2-s: stage 0 has two fused blocks without expansion (timm's ConvBnAct, mmpretrain's EnhancedConvModule),
    24 -> 24 with a shortcut each, and a stride-1 MBConv stage that mmpretrain keeps as a layer of its own."""
    arch, classes, _ = SYNTH[FILES[file][0]]
    got = family_run["logits"][f"{file}@{size}"]
    assert got.shape == (2, classes)
    diff, limit = assert_close(got, _effconv_logits(family_run, file, size), what=f"{file} at {size}px")
    print(f"{file} at {size}px vs effconv.models.load: max |diff| {diff:.3g} (limit {limit:.3g})")
    assert 1e-3 < np.abs(got).max() < 100  # a network that kept its signal and did not explode: a fair comparison


def test_synthetic_v2_s_has_the_blocks_it_is_meant_to_test():
    """What the v2-s comparison rests on: a no-expand stage of two blocks with shortcuts, a stride-1 later stage."""
    blocks = spec.blocks("v2-s")
    stage0 = [b for b in blocks if b.stage == 0]
    assert len(stage0) == 2 and all(b.variant == "fused_mbconv:no_expand" and b.has_residual for b in stage0)
    first_of_stage = {b.stage: b for b in reversed(blocks)}
    assert any(b.stride == 1 and b.kind == "mbconv" for stage, b in first_of_stage.items() if stage > 0)


@pytest.mark.parametrize("arch", [*LITE, *EDGETPU, *CONDCONV, *V2])
def test_timm_keys_and_shapes_for_every_size(family_run, arch):
    real = family_run["keys"]["timm"][arch]
    shapes, _ = model_tensor_shapes(arch, 1000)
    names = engine.layout_names(get_layout("timm"), arch, 1000)
    ours = {names[k]: list(v) for k, v in shapes.items()}
    assert set(ours) == set(real), (arch, sorted(set(ours) ^ set(real))[:5])
    assert ours == real, arch


@pytest.mark.parametrize("arch", [*sorted(mmpretrain.BACKBONES["edgetpu"]), *V2])
def test_mmpretrain_keys_and_shapes(family_run, arch):
    real = family_run["keys"]["mmpretrain"][arch]
    shapes, _ = model_tensor_shapes(arch, 1000)
    names = engine.layout_names(get_layout("mmpretrain"), arch, 1000)
    ours = {names[k]: list(v) for k, v in shapes.items()}
    assert set(ours) == set(real), (arch, sorted(set(ours) ^ set(real))[:5])
    assert ours == real, arch


def test_mmpretrain_v2_layers_are_its_stages():
    """mmpretrain's EfficientNetV2 numbers layers by stage (v2-b0's stride-1 stage 5 is layer 5, not part of
    layer 4 as in its EfficientNet), the head conv after the last stage; the B family keeps the joined layers."""
    names = engine.layout_names(get_layout("mmpretrain"), "v2-b0", 10)
    first_of_stage5 = next(b.index for b in spec.blocks("v2-b0") if b.stage == 4)
    assert names[f"blocks.{first_of_stage5}.expand_conv.weight"] == "backbone.layers.5.0.expand_conv.conv.weight"
    assert names["head.conv.weight"] == "backbone.layers.7.conv.weight"
    assert names["blocks.0.project_conv.weight"] == "backbone.layers.1.0.conv.weight"
    b0 = engine.layout_names(get_layout("mmpretrain"), "b0", 10)
    assert b0["head.conv.weight"] == "backbone.layers.6.conv.weight"  # b0's 7 stages in 5 layers, unchanged


def test_mmpretrain_el_is_not_the_official_edgetpu_l(family_run):
    """What NOT_OFFICIAL says, checked against the real backbone: only block 0's expanded width differs."""
    real = family_run["keys"]["mmpretrain"]["edgetpu-l"]
    shapes, _ = model_tensor_shapes("edgetpu-l", 1000)
    names = engine.layout_names(get_layout("mmpretrain"), "edgetpu-l", 1000)
    ours = {names[k]: list(v) for k, v in shapes.items()}
    assert set(ours) == set(real)
    differ = {k: (ours[k], real[k]) for k in ours if ours[k] != real[k]}
    assert differ["backbone.layers.1.0.conv1.conv.weight"] == ([128, 40, 3, 3], [120, 40, 3, 3])
    assert {k.rsplit(".", 2)[0] for k in differ} == {"backbone.layers.1.0.conv1", "backbone.layers.1.0.conv2"}
    assert "120" in mmpretrain.NOT_OFFICIAL["edgetpu-l"] and "128" in mmpretrain.NOT_OFFICIAL["edgetpu-l"]


def _check_timm_data_config(card: dict, config: dict) -> None:
    """timm's resolved data config is the card's: size, mean/std (0-1 scale), crop and resize kernel."""
    pre, size = card["preprocessing"], card["image_size"]
    np.testing.assert_allclose(config["mean"], np.array(pre["mean"]) / 255)
    np.testing.assert_allclose(config["std"], np.array(pre["std"]) / 255)
    assert config["input_size"] == [3, size, size]
    assert config["interpolation"] == ("bilinear" if pre["interpolation"].startswith("bilinear") else "bicubic")
    if pre["crop"] == "none":  # the whole image resized to size x size
        assert config["crop_mode"] == "squash" and config["crop_pct"] == 1.0
    else:
        assert config["crop_mode"] == "center" and abs(config["crop_pct"] - size / (size + 32)) < 5e-4


@pytest.mark.parametrize("file", list(FILES))
def test_card_line_loads_the_weights_and_gives_the_cards_data_config(family_run, file):
    card, config = family_run["cards"][file], family_run["configs"][file]
    pre = card["preprocessing"]
    source = FILES[file][0]
    want = _effconv_logits(family_run, file, "x_odd" if source not in SYNTH else SYNTH_SIZES[-1])
    assert_close(family_run["card_logits"][file], want, what=f"{file}: the card's create line")
    if card["layout"] == "timm":
        _check_timm_data_config(card, config)
    else:
        np.testing.assert_allclose(config["mean"], pre["mean"])
        np.testing.assert_allclose(config["std"], pre["std"])
    assert "size mismatch" not in family_run["output"]


@pytest.mark.parametrize("name", list(V2_META_CARDS))
def test_timm_v2_release_cards_name_timms_tag_and_give_the_cards_data_config(family_run, name):
    """The 21k and 21k-fine-tuned releases: timm's own tag, and the card's (bilinear, crop or squash) data config."""
    card = family_run["cards"][name]
    tag = timm.TAGS[card["variant"]]
    assert card["timm"]["pretrained_name"] == f"{timm.model_name(card['arch'])}.{tag}"
    assert card["timm"]["pretrained_name"] in family_run["names"]["timm"]
    _check_timm_data_config(card, family_run["configs"][name])


def test_timm_names_and_tags_are_timms_own(family_run):
    names = set(family_run["names"]["timm"])
    assert timm.model_name("lite0") == "tf_efficientnet_lite0" and timm.model_name("edgetpu-l") == "tf_efficientnet_el"
    assert timm.model_name("condconv-b0-8e-depth") == "tf_efficientnet_cc_b1_8e"
    assert timm.model_name("v2-xl") == "tf_efficientnetv2_xl"
    for arch in (*LITE, *EDGETPU, *CONDCONV, *V2):
        for tag, archs in timm.TAGGED_ARCHS.items():
            assert (arch in archs) == (f"{timm.model_name(arch)}.{tag}" in names), (arch, tag)
    assert family_run["cards"]["edgetpu-s-timm.safetensors"]["timm"]["pretrained_name"] == "tf_efficientnet_es.in1k"
    cards = family_run["cards"]
    assert cards["condconv-b0-4e-timm.safetensors"]["timm"]["pretrained_name"] == "tf_efficientnet_cc_b0_4e.in1k"
    assert cards["v2-b0-timm.pth"]["timm"]["pretrained_name"] == "tf_efficientnetv2_b0.in1k"


def test_mmpretrain_has_no_models_of_these_families(family_run):
    """mmpretrain ships EdgeTPU configs but no EdgeTPU weights, and nothing of Lite: the card builds from its config."""
    known = family_run["names"]["mmpretrain"]
    assert not [
        n
        for n in known
        if "lite" in n or "cc" in n or n.startswith(("efficientnet-es", "efficientnet-em", "efficientnet-el"))
    ]
    section = family_run["cards"]["edgetpu-s-mm.pth"]["mmpretrain"]
    assert section["get_model"] is None and section["config"] == "efficientnet-es_8xb32-01norm_in1k"
    assert section["model"]["backbone"] == {"type": "EfficientNet", "arch": "es", "act_cfg": RELU}
    assert section["create"].startswith("get_model(mmengine.Config(") and "note" in section  # its (x-127.5)/127.5


def test_mmpretrain_v2_cards_name_its_models_and_configs(family_run):
    """V2_MODELS and the config names against mmpretrain's own lists; a model is named only where its data
    preprocessor is the card's (v2-b0: ImageNet mean/std), else the card builds from the config (v2-s's
    (x - 128) / 128 is not mmpretrain's (x - 127.5) / 127.5, which the note says)."""
    known, configs = set(family_run["names"]["mmpretrain"]), set(family_run["names"]["mmpretrain_configs"])
    for variant, (pattern, archs) in mmpretrain.V2_MODELS.items():
        for arch in V2:
            short = arch.removeprefix("v2-")
            assert (pattern.format(arch=short) in known) == (short in archs), (variant, arch)
    wanted = {*mmpretrain.V2_CONFIGS.values(), *(mmpretrain.V2_IN21K_CONFIG.format(arch=a) for a in "s m l xl".split())}
    assert wanted | set(mmpretrain.EDGETPU_CONFIGS.values()) <= configs
    b0 = family_run["cards"]["v2-b0-mm.pth"]["mmpretrain"]
    assert b0["get_model"] == "efficientnetv2-b0_3rdparty_in1k" and "head=dict(num_classes=10)" in b0["create"]
    assert b0["model"]["backbone"] == {"type": "EfficientNetV2", "arch": "b0"} and "note" not in b0
    s = family_run["cards"]["v2-s-mm.pth"]["mmpretrain"]
    assert s["get_model"] is None and s["config"] == "efficientnetv2-s_8xb32_in1k-384px" and "note" in s
    ft = mmpretrain.card_section(_card("v2-s", 1000, "in21k-ft1k"))  # (x - 127.5) / 127.5: mmpretrain's own
    assert ft["get_model"] == "efficientnetv2-s_in21k-pre_3rdparty_in1k" and "note" not in ft
    in21k = mmpretrain.card_section(_card("v2-xl", 21843, "in21k", 224))
    assert in21k["config"] == "efficientnetv2-xl_8xb32_in21k" and in21k["get_model"] is None


def _convert_refused(src, tmp_path, layout: str):
    out = tmp_path / ("out" if layout == "hf" else "out.pth")
    result = run_cli("convert", "--src", src, "--out", out, "--layout", layout, "--variant", "standard", "-q")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert list(tmp_path.iterdir()) == []  # refused before anything was written
    return result.stderr


@pytest.mark.parametrize(("fixture", "layout", "family", "instead"), [
    ("official-lite0", "mmpretrain", "'lite'", "native or timm"),
    ("official-lite0", "hf", "(family 'lite')", "native or timm"),
    ("official-edgetpu-s", "hf", "(family 'edgetpu')", "native, timm or mmpretrain"),
    ("official-condconv-b0-4e", "mmpretrain", "'condconv'", "native or timm"),
    ("official-condconv-b0-4e", "hf", "(family 'condconv')", "native or timm"),
    ("official-v2-b0", "hf", "(family 'v2')", "native, timm or mmpretrain"),
])  # fmt: skip
def test_layouts_that_cannot_hold_the_family_refuse_before_work(
    tmp_path, monkeypatch, fixture, layout, family, instead
):
    from effconv.formats.bundle import TensorBundleReader

    read = TensorBundleReader.read

    def no_weights_read(self, name, *args, **kwargs):
        assert name == "global_step", f"{name} was read"  # the card's training step: a scalar, read early
        return read(self, name, *args, **kwargs)

    monkeypatch.setattr(TensorBundleReader, "read", no_weights_read)
    stderr = _convert_refused(_fixture(fixture) / "ckpt", tmp_path, layout)
    assert f"--layout {layout} cannot hold {spec.official_name(fixture.removeprefix('official-'))}" in stderr
    assert family in stderr and f"use --layout {instead}" in stderr.replace("\n", "")


def test_refusals_name_the_model_and_why():
    with pytest.raises(UsageError, match=r"cannot hold efficientnet-edgetpu-L: mmpretrain's arch 'el'"):
        LAYOUT_CHECKS["mmpretrain"]("edgetpu-l", 300)
    with pytest.raises(UsageError, match="mmpretrain has no model of the 'lite' family"):
        mmpretrain.card_section(_card("lite2", 1000))
    for arch in CONDCONV:
        with pytest.raises(UsageError, match="mmpretrain has no model of the 'condconv' family"):
            LAYOUT_CHECKS["mmpretrain"](arch, 224)
    for arch in V2:
        LAYOUT_CHECKS["mmpretrain"](arch, 225)  # mmpretrain's EfficientNetV2 is exact at any input size
    for arch in (*LITE, *EDGETPU, *CONDCONV, *V2):
        LAYOUT_CHECKS["timm"](arch, 225)  # timm has every size, at any input size
        with pytest.raises(UsageError, match="transformers' EfficientNet differs"):
            hf.check_expressible(arch, 224)
    with registered(), pytest.raises(UsageError, match="timm has no tf_ model of the 'toynet' family"):
        LAYOUT_CHECKS["timm"]("t1", 72)
