"""Issue 4: timm and mmpretrain layouts, safetensors and half precision.

The layouts are proven against the REAL libraries: tests/support/library_side.py runs in
.venv-timm (scripts/bootstrap.sh makes it; timm needs a torch/torchvision pair that
the main venv must not carry), loads the converted files strictly into
`timm.create_model('tf_efficientnet_b0')` and mmpretrain's `ImageClassifier`, and
lists both libraries' keys and shapes for every arch. A missing .venv-timm fails.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from effconv.convert import convert_checkpoint
from effconv.errors import UsageError
from effconv.mappings import engine, mmpretrain, timm
from effconv.mappings.layouts import LAYOUT_NAMES, get_layout
from effconv.models import create_model, load, spec
from effconv.models.efficientnet import model_tensor_shapes
from effconv.output.artifact import card_from_metadata, read_weights
from tests.conftest import PROJECT_ROOT
from tests.support.helpers import assert_close, max_abs, nchw, run_cli, run_library_side

TIMM_PYTHON = PROJECT_ROOT / ".venv-timm" / "bin" / "python"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
UNIT_ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8}
FILE_LAYOUTS = [name for name in LAYOUT_NAMES if get_layout(name).folder is None]  # hf: test_hf_layout.py
# The B family's archs; Lite and EdgeTPU: tests/integration/test_family_layouts.py.
B_ARCHS = tuple(a for a in spec.ARCH_NAMES if spec.get_arch(a).family == "efficientnet")


def _convert(src, out, *args) -> dict:
    result = run_cli("convert", "--src", src, "--out", out, "--variant", "standard", "-q", *args)
    assert result.exit_code == 0, result.output
    return json.loads(out.with_suffix(".json").read_text())


@pytest.fixture(scope="module")
def library_run(tmp_path_factory, fixture_ckpt, oracle):
    """The real libraries' view of the fixture's conversions, and their keys for every arch."""
    if not TIMM_PYTHON.is_file():
        pytest.fail(f"{TIMM_PYTHON} missing: run scripts/bootstrap.sh (CI does) to create .venv-timm")
    tmp = tmp_path_factory.mktemp("libraries")
    jobs = []
    for library in ("timm", "mmpretrain"):
        for suffix in (".pth", ".safetensors"):
            out = tmp / suffix.lstrip(".") / f"{library}{suffix}"  # X.pth and X.safetensors share X.json
            out.parent.mkdir(exist_ok=True)
            _convert(fixture_ckpt, out, "--layout", library)
            jobs.append(
                {
                    "name": out.name,
                    "library": library,
                    "arch": "b0",
                    "num_classes": 1000,
                    "head_channels": spec.head_channels("b0"),
                    "weights": str(out),
                }
            )
    np.savez(tmp / "x.npz", x=nchw(oracle["x"]).numpy())
    keys = {
        "archs": list(B_ARCHS),
        "libraries": ["timm", "mmpretrain"],
        "head_channels": {a: spec.head_channels(a) for a in B_ARCHS},
    }
    (tmp / "jobs.json").write_text(json.dumps({"input": str(tmp / "x.npz"), "load": jobs, "keys": keys}))
    run_library_side(tmp)
    with np.load(tmp / "logits.npz") as data:
        logits = {k: data[k] for k in data.files}
    return logits, json.loads((tmp / "keys.json").read_text())


@pytest.mark.parametrize("library", ["timm", "mmpretrain"])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_real_library_reproduces_official_logits(library_run, oracle, library, suffix):
    logits = library_run[0][f"{library}{suffix}"]
    diff, limit = assert_close(logits, oracle["logits_ema"])
    print(f"{library} {suffix}: official-b0 logits_ema max |diff| = {diff:.3g} (limit {limit:.3g})")
    assert (logits.argmax(1) == oracle["logits_ema"].argmax(1)).all()


@pytest.mark.parametrize("library", ["timm", "mmpretrain"])
def test_layout_keys_and_shapes_match_the_real_library_for_every_arch(library_run, library):
    real = library_run[1][library]
    for arch in B_ARCHS:
        shapes, _ = model_tensor_shapes(arch, 1000)
        names = engine.layout_names(get_layout(library), arch, 1000)
        ours = {names[k]: list(v) for k, v in shapes.items()}
        assert set(ours) == set(real[arch]), (arch, sorted(set(ours) ^ set(real[arch]))[:5])
        assert ours == real[arch], arch


@pytest.fixture(scope="module")
def native_states(fixture_ckpt) -> dict[str, dict[str, torch.Tensor]]:
    """The native conversion in each dtype, in memory: what every layout must hold, renamed."""
    return {d: convert_checkpoint(fixture_ckpt, variant="standard", dtype=d).state_dict for d in DTYPES}


def _native(state: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    back = {v: k for k, v in engine.layout_names(get_layout(layout), "b0", 1000).items()}
    return {back[k]: v for k, v in state.items()}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("layout", FILE_LAYOUTS)
def test_every_layout_format_and_dtype(fixture_ckpt, native_states, tmp_path, layout, dtype):
    cards, states = {}, {}
    for suffix in (".pth", ".safetensors"):
        out = tmp_path / f"b0{suffix}"
        cards[suffix] = _convert(fixture_ckpt, out, "--layout", layout, "--dtype", dtype)
        states[suffix] = read_weights(out)
        out.with_suffix(".json").rename(tmp_path / f"card{suffix}.json")  # both formats share X.json
    pth, st = states[".pth"], states[".safetensors"]
    assert set(pth) == set(st) and all(torch.equal(pth[k], st[k]) for k in pth)  # same tensors back
    native = native_states[dtype]
    assert _native(pth, layout).keys() == native.keys()
    assert all(torch.equal(v, native[k]) for k, v in _native(pth, layout).items())  # only the names differ
    for name, tensor in pth.items():
        want = torch.int64 if name.endswith("num_batches_tracked") else DTYPES[dtype]
        want = torch.float32 if name.endswith(("running_mean", "running_var")) else want
        assert tensor.dtype == want, name
    card = cards[".safetensors"]
    assert card["layout"] == layout and card["dtype"] == dtype and card["file_format"] == "safetensors"
    assert cards[".pth"]["file_format"] == "torch"
    from safetensors import safe_open

    with safe_open(tmp_path / "b0.safetensors", "pt") as f:
        assert card_from_metadata(f.metadata()) == card  # the metadata is the model card
    if layout == "mmpretrain":  # mmpretrain's checkpoint shape: the state dict under "state_dict", the card as meta
        raw = torch.load(tmp_path / "b0.pth", weights_only=True)
        assert set(raw) == {"state_dict", "meta"} and raw["meta"] == cards[".pth"]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_logits_against_float32(native_states, oracle, dtype):
    x = nchw(oracle["x"])
    with torch.no_grad():
        reference = create_model("b0")
        reference.load_state_dict(native_states["float32"])
        float32_logits = reference(x).numpy()
        assert_close(float32_logits, oracle["logits_ema"])
        model = create_model("b0")
        model.load_state_dict(native_states[dtype])  # weights rounded to dtype, float32 compute
        rounded = max_abs(model(x).numpy(), float32_logits)
        computed = max_abs(model.to(DTYPES[dtype])(x.to(DTYPES[dtype])).float().numpy(), float32_logits)
    # Rounding every weight once costs a few unit roundoffs of the logits' scale; computing in the
    # dtype as well roughly doubles it (measured on this fixture: fp16 0.037 / 0.041, bf16 0.30 / 0.61).
    scale = float(np.abs(float32_logits).max()) * UNIT_ROUNDOFF[dtype]
    print(f"{dtype}: logits max |diff| vs float32 {rounded:.3g} (float32 compute), {computed:.3g} ({dtype} compute)")
    assert rounded <= 25 * scale and computed <= 50 * scale


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("layout", ["native", "timm", "mmpretrain"])
def test_effconv_load_takes_every_layout_format_and_dtype(fixture_ckpt, oracle, tmp_path, layout, dtype):
    """Issue 11: the file a user ships (any layout, .pth or .safetensors, any dtype) loads in effconv, as float32."""
    x = nchw(oracle["x"])
    for suffix in (".pth", ".safetensors"):
        out = tmp_path / suffix[1:] / f"b0{suffix}"
        out.parent.mkdir()
        _convert(fixture_ckpt, out, "--layout", layout, "--dtype", dtype)
        model = load(out)
        assert model.card.layout == layout and model.card.dtype == dtype
        assert all(v.dtype in (torch.float32, torch.int64) for v in model.state_dict().values())
        with torch.no_grad():
            logits = model(x).numpy()
        if dtype == "float32":
            assert_close(logits, oracle["logits_ema"], what=f"{layout}{suffix}")
        else:  # rounded weights, float32 compute: as test_half_precision_logits_against_float32 measures
            assert max_abs(logits, oracle["logits_ema"]) <= 25 * UNIT_ROUNDOFF[dtype] * np.abs(logits).max()


def test_effconv_load_reports_a_file_that_does_not_fit_its_layout(fixture_ckpt, tmp_path):
    out = tmp_path / "b0.safetensors"
    _convert(fixture_ckpt, out, "--layout", "timm")
    card = json.loads(out.with_suffix(".json").read_text())
    out.with_suffix(".json").write_text(json.dumps({**card, "layout": "mmpretrain"}))  # timm names, mmpretrain card
    with pytest.raises(UsageError, match="does not fit the b0 model"):
        load(out)
    out.with_suffix(".json").write_text(json.dumps({**card, "layout": "keras"}))
    with pytest.raises(UsageError, match="unknown layout 'keras'"):
        load(out)


def test_layers_merge_every_stride_1_stage_after_the_first():
    for arch in spec.ARCH_NAMES:
        layers = engine.layer_groups(arch)
        strides = [next(b.stride for b in spec.blocks(arch) if b.stage == s) for s in range(len(layers))]
        assert layers[0] == 1 and engine.global_fields(arch)["head_layer"] == max(layers) + 1
        for s in range(1, len(layers)):
            assert layers[s] == layers[s - 1] + (strides[s] != 1)
    assert engine.layer_groups("b0") == (1, 2, 3, 4, 4, 5, 5)  # FACTS.md: stages 4+5 and 6+7 merged


def _card(arch="b0", variant="standard", size=224, mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375)):
    pre = {"image_size": size, "crop_fraction": size / (size + 32), "mean": list(mean), "std": list(std)}
    return {"arch": arch, "variant": variant, "image_size": size, "preprocessing": pre, "num_classes": 1000}


def test_timm_pretrained_cfg():
    cfg = timm.card_section(_card("b3", "advprop", 300, (127.5,) * 3, (127.5,) * 3))["pretrained_cfg"]
    assert cfg["architecture"] == "tf_efficientnet_b3" and cfg["tag"] == "ap_in1k"
    assert cfg["mean"] == [0.5] * 3 and cfg["std"] == [0.5] * 3
    assert cfg["input_size"] == [3, 300, 300] and cfg["crop_pct"] == 0.904 and cfg["interpolation"] == "bicubic"
    std = timm.card_section(_card())["pretrained_cfg"]
    assert std["mean"] == [0.485, 0.456, 0.406] and std["std"] == [0.229, 0.224, 0.225] and std["crop_pct"] == 0.875
    assert timm.card_section(_card("l2", "noisystudent", 475))["pretrained_cfg"]["tag"] == "ns_jft_in1k_475"


def test_mmpretrain_config_names():
    advprop = _card("b8", "advprop", 672, (127.5,) * 3, (127.5,) * 3)
    assert mmpretrain.card_section(advprop)["config"] == "efficientnet-b8_8xb32-01norm_in1k"
    assert mmpretrain.card_section(advprop)["get_model"] == "efficientnet-b8_3rdparty_8xb32-aa-advprop_in1k"
    standard = mmpretrain.card_section(_card("b4", size=380))
    assert standard["config"] == "efficientnet-b4_8xb32_in1k" and "note" not in standard
    assert standard["get_model"] == "efficientnet-b4_3rdparty_8xb32_in1k"  # the standard variant's own model
    aa = mmpretrain.card_section(_card("b4", "aa", size=380))
    assert aa["get_model"] == "efficientnet-b4_3rdparty_8xb32-aa_in1k"
    assert mmpretrain.card_section(_card("b6", size=528))["get_model"] == "efficientnet-b6_3rdparty_8xb32-aa_in1k"
    assert standard["model"]["head"] == {"type": "LinearClsHead", "num_classes": 1000, "in_channels": 1792}
    assert mmpretrain.card_section(_card("l2", size=475))["config"] == "efficientnet-l2_8xb32_in1k-475px"
    assert mmpretrain.card_section(_card("l2", size=800))["config"] == "efficientnet-l2_8xb8_in1k-800px"
    odd = mmpretrain.card_section(_card(mean=(1.0, 2.0, 3.0)))
    assert "note" in odd and odd["data_preprocessor"]["mean"] == [1.0, 2.0, 3.0]


def test_usage_errors(fixture_ckpt, tmp_path):
    out = tmp_path / "b0.safetensors"
    assert run_cli("convert", "--src", fixture_ckpt, "--out", out, "-q", "--variant", "standard").exit_code == 0
    again = run_cli("convert", "--src", fixture_ckpt, "--out", out, "-q", "--variant", "standard")
    assert again.exit_code == 2 and "use --force" in again.stderr
    bad = run_cli("convert", "--src", fixture_ckpt, "--out", tmp_path / "b0.bin")
    assert bad.exit_code == 2 and ".safetensors" in bad.stderr
    assert run_cli("convert", "--src", fixture_ckpt, "--out", out, "--layout", "keras").exit_code == 2
    assert run_cli("convert", "--src", fixture_ckpt, "--out", out, "--dtype", "int8").exit_code == 2


# Issue 11 §3: the cards' own lines, run in the real libraries. Every variant's timm card must give, through
# `timm.data.resolve_model_data_config`, the card's mean/std, crop and input size; a 10-class file must keep its
# head in timm and in mmpretrain. Files: the official-b0 fixture converted as each variant, and a synthetic 10-class
# b0; archs and sizes no small file has (b3 AdvProp, b5 RandAugment, b8, l2 at 475 and 800) run the same line with
# pretrained=False on the meta device (no weights: only the data config counts).
CARD_VARIANTS = ("standard", "aa", "advprop", "noisystudent", "randaug")
META_CARDS = {  # name -> (arch, variant, input size)
    "b3-advprop": ("b3", "advprop", 300),
    "b5-randaug": ("b5", "randaug", 456),
    "b8-advprop": ("b8", "advprop", 672),
    "l2-noisystudent-475": ("l2", "noisystudent", 475),
    "l2-noisystudent-800": ("l2", "noisystudent", 800),
}


def _card_job(name: str, library: str, statements: str, weights, x_path) -> dict:
    return {"name": name, "library": library, "statements": statements, "weights": weights, "input": x_path}


def _meta_card(arch: str, variant: str, size: int) -> dict:
    from effconv.variants import preprocessing

    return {"arch": arch, "variant": variant, "image_size": size, "num_classes": 1000,
            "preprocessing": preprocessing(variant, size, arch)}  # fmt: skip


@pytest.fixture(scope="module")
def card_run(tmp_path_factory, fixture_ckpt, oracle):
    """The cards of timm and mmpretrain files, and what their own lines give in the real libraries."""
    from effconv.parity.synth import write_synthetic_checkpoint

    if not TIMM_PYTHON.is_file():
        pytest.fail(f"{TIMM_PYTHON} missing: run scripts/bootstrap.sh (CI does) to create .venv-timm")
    tmp = tmp_path_factory.mktemp("cards")
    x_path = tmp / "x.npz"
    np.savez(x_path, x=nchw(oracle["x"]).numpy())
    cards, jobs = {}, []
    for i, variant in enumerate(CARD_VARIANTS):
        out = tmp / f"b0-{variant}.{'safetensors' if i % 2 else 'pth'}"  # both formats, as timm takes either
        result = run_cli("convert", "--src", fixture_ckpt, "--out", out, "--layout", "timm", "--variant", variant, "-q")
        assert result.exit_code == 0, result.output
        cards[variant] = json.loads(out.with_suffix(".json").read_text())
        jobs.append(_card_job(variant, "timm", f"model = {cards[variant]['timm']['create']}", str(out), str(x_path)))
    for name, (arch, variant, size) in META_CARDS.items():
        cards[name] = {**_meta_card(arch, variant, size), "timm": timm.card_section(_meta_card(arch, variant, size))}
        line = cards[name]["timm"]["create"].replace("pretrained=True", "pretrained=False")
        jobs.append(_card_job(name, "timm", f"model = {line}", None, None))
    write_synthetic_checkpoint("b0", tmp / "ten", num_classes=10, seed=3)
    for layout in ("timm", "mmpretrain"):
        for suffix in (".pth", ".safetensors"):
            out = tmp / f"ten-{layout}-{suffix[1:]}{suffix}"  # X.pth and X.safetensors would share X.json
            result = run_cli("convert", "--src", tmp / "ten", "--out", out, "--layout", layout, "-q")
            assert result.exit_code == 0, result.output
            card = cards[f"ten-{layout}{suffix}"] = json.loads(out.with_suffix(".json").read_text())
            section = card[layout]
            line = section["create"] if layout == "timm" or suffix == ".pth" else section["create_safetensors"]
            line = line if line.startswith("model = ") else f"model = {line}"
            jobs.append(_card_job(f"ten-{layout}{suffix}", layout, line, str(out), str(x_path)))
    (tmp / "jobs.json").write_text(json.dumps({"cards": jobs}))
    output = run_library_side(tmp)
    with np.load(tmp / "card_logits.npz") as data:
        logits = {k: data[k] for k in data.files}
    configs = json.loads((tmp / "cards.json").read_text())
    names = json.loads((tmp / "model_names.json").read_text())
    return {"cards": cards, "configs": configs, "logits": logits, "names": names, "dir": tmp,
            "output": output}  # fmt: skip


@pytest.mark.parametrize("name", [*CARD_VARIANTS, *META_CARDS])
def test_timm_card_line_gives_the_cards_data_config(card_run, name):
    card, config = card_run["cards"][name], card_run["configs"][name]
    pre, size = card["preprocessing"], card["image_size"]
    print(f"{name}: {card['timm']['pretrained_name']} -> {config}")
    assert config["input_size"] == [3, size, size]
    np.testing.assert_allclose(config["mean"], np.array(pre["mean"]) / 255, rtol=1e-6)
    np.testing.assert_allclose(config["std"], np.array(pre["std"]) / 255, rtol=1e-6)
    assert abs(config["crop_pct"] - size / (size + 32)) < 5e-4 and config["crop_mode"] == "center"
    assert config["interpolation"] == "bicubic"


def test_timm_card_line_names_the_variants_pretrained_tag(card_run):
    sections = {name: card_run["cards"][name]["timm"] for name in (*CARD_VARIANTS, *META_CARDS)}
    assert sections["advprop"]["pretrained_name"] == "tf_efficientnet_b0.ap_in1k"
    assert sections["b3-advprop"]["create"].startswith(
        "timm.create_model('tf_efficientnet_b3.ap_in1k', pretrained=True"
    )
    assert sections["l2-noisystudent-475"]["pretrained_name"] == "tf_efficientnet_l2.ns_jft_in1k_475"
    assert sections["randaug"]["pretrained_name"] == "tf_efficientnet_b0"  # timm has no b0.ra_in1k
    assert sections["b5-randaug"]["pretrained_name"] == "tf_efficientnet_b5.ra_in1k"
    for tag, archs in timm.TAGGED_ARCHS.items():  # effconv's table of timm's tags is timm's own
        for arch in B_ARCHS:
            name = f"tf_efficientnet_{arch}.{tag}"
            assert (arch in archs) == (name in card_run["names"]["timm"]), name


@pytest.mark.parametrize("variant", CARD_VARIANTS)
def test_timm_card_line_loads_the_weights(card_run, fixture_ckpt, oracle, variant):
    assert_close(card_run["logits"][variant], oracle["logits_ema"], what=variant)


@pytest.mark.parametrize("library", ["timm", "mmpretrain"])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_ten_class_card_line_keeps_the_head(card_run, oracle, library, suffix):
    """get_model(name, pretrained=file) alone kept a random 1000-class head: the card's line must not."""
    name = f"ten-{library}{suffix}"
    ours = load(card_run["dir"] / f"ten-{library}-{suffix[1:]}{suffix}")
    with torch.no_grad():
        want = ours(nchw(oracle["x"])).numpy()
    got = card_run["logits"][name]
    assert got.shape == (len(oracle["x"]), 10)
    diff, limit = assert_close(got, want, what=name)
    print(f"{name}: the card's line in {library} vs effconv.models.load: max |diff| {diff:.3g} (limit {limit:.3g})")
    assert "size mismatch" not in card_run["output"]


def test_mmpretrain_card_names_exist_in_mmpretrain(card_run):
    known = set(card_run["names"]["mmpretrain"])
    for variant, (pattern, archs) in mmpretrain.VARIANT_MODELS.items():
        for arch in B_ARCHS:
            assert (pattern.format(arch=arch) in known) == (arch in archs), (variant, arch)
    section = card_run["cards"]["ten-mmpretrain.pth"]["mmpretrain"]
    assert (
        section["get_model"] == "efficientnet-b0_3rdparty_8xb32_in1k"
        and "head=dict(num_classes=10)" in section["create"]
    )
