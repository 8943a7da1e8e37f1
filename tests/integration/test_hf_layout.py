"""Issue 11 section 2: `--layout hf` writes a folder transformers' `from_pretrained` loads, offline.

Proven against the REAL transformers in .venv-timm (tests/support/library_side.py, with
HF_HUB_OFFLINE=1): the fixture's folder reproduces the official logits, the exact padding holds only
at the size the folder was converted for, and the layout's keys and shapes are those of a fresh
`EfficientNetForImageClassification(config)` for every arch.
"""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
import torch

from effconv.convert import convert_checkpoint
from effconv.errors import UsageError
from effconv.mappings import engine, hf
from effconv.mappings.layouts import get_layout
from effconv.models import create_model, spec
from effconv.models.efficientnet import model_tensor_shapes
from effconv.output.artifact import read_weights
from tests.conftest import PROJECT_ROOT
from tests.support.families import registered
from tests.support.helpers import assert_close, nchw, run_cli

TIMM_PYTHON = PROJECT_ROOT / ".venv-timm" / "bin" / "python"
# The B family's archs, the only ones transformers has (Lite and EdgeTPU are refused: test_family_layouts.py).
B_ARCHS = tuple(a for a in spec.ARCH_NAMES if spec.get_arch(a).family == "efficientnet")
LIBRARY_SIDE = PROJECT_ROOT / "tests" / "support" / "library_side.py"
FOLDER_FILES = {"config.json", "model.safetensors", "preprocessor_config.json", "model.json"}


def _convert(src, out, *args):
    return run_cli("convert", "--src", src, "--out", out, "--variant", "standard", "--layout", "hf", "-q", *args)


def _card(arch: str, size: int | None = None) -> dict:
    size = size or spec.get_arch(arch).resolution
    pre = {"image_size": size, "crop_fraction": size / (size + 32), "mean": [127.0] * 3, "std": [128.0] * 3}
    return {"arch": arch, "num_classes": 1000, "image_size": size, "preprocessing": pre}


@pytest.fixture(scope="module")
def folders(tmp_path_factory, fixture_ckpt):
    tmp = tmp_path_factory.mktemp("hf")
    for name, args in (("b0-hf", ()), ("b0-hf-240", ("--image-size", "240"))):
        result = _convert(fixture_ckpt, tmp / name, *args)
        assert result.exit_code == 0, result.output
    return tmp


@pytest.fixture(scope="module")
def hf_run(folders, oracle):
    """transformers' view: logits of the folders loaded offline, and keys of fresh models of every arch."""
    if not TIMM_PYTHON.is_file():
        pytest.fail(f"{TIMM_PYTHON} missing: run scripts/bootstrap.sh (CI does) to create .venv-timm")
    np.savez(folders / "x.npz", x=nchw(oracle["x"]).numpy())
    x240 = torch.randn(2, 3, 240, 240, generator=torch.Generator().manual_seed(0))
    np.savez(folders / "x240.npz", x=x240.numpy())
    jobs = [
        {"name": "fixture", "library": "hf", "weights": str(folders / "b0-hf")},
        {"name": "224-at-240", "library": "hf", "weights": str(folders / "b0-hf"), "input": str(folders / "x240.npz")},
        {"name": "240", "library": "hf", "weights": str(folders / "b0-hf-240"), "input": str(folders / "x240.npz")},
    ]
    keys = {
        "archs": list(B_ARCHS),
        "libraries": ["hf"],
        "head_channels": {a: spec.head_channels(a) for a in B_ARCHS},
        "hf_configs": {a: hf.config(_card(a)) for a in B_ARCHS},
    }
    (folders / "jobs.json").write_text(json.dumps({"input": str(folders / "x.npz"), "load": jobs, "keys": keys}))
    proc = subprocess.run(
        [str(TIMM_PYTHON), str(LIBRARY_SIDE), str(folders / "jobs.json"), str(folders)],
        capture_output=True,
        text=True,
        timeout=400,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    assert proc.returncode == 0, f"library side failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    print(proc.stdout)
    with np.load(folders / "logits.npz") as data:
        logits = {k: data[k] for k in data.files}
    return logits, json.loads((folders / "keys.json").read_text())["hf"], x240


def test_from_pretrained_reproduces_the_official_logits(hf_run, oracle):
    logits = hf_run[0]["fixture"]
    diff, limit = assert_close(logits, oracle["logits_ema"], what="transformers vs official b0")
    print(f"hf: official-b0 logits_ema max |diff| = {diff:.3g} (limit {limit:.3g})")
    assert (logits.argmax(1) == oracle["logits_ema"].argmax(1)).all()


def test_padding_is_exact_at_the_converted_size_only(hf_run, fixture_ckpt):
    """b0 at 240: the stride-2 block at side 15 pads symmetrically in TF; only the 240 folder lists it."""
    logits, _, x240 = hf_run
    model = create_model("b0")
    model.load_state_dict(convert_checkpoint(fixture_ckpt, variant="standard").state_dict)
    with torch.no_grad():
        exact = model.eval()(x240).numpy()  # TF 'SAME' at any size
    assert_close(logits["240"], exact, what="converted for 240, run at 240")
    assert np.abs(logits["224-at-240"] - exact).max() > 100 * np.abs(logits["240"] - exact).max()


def test_keys_and_shapes_match_a_fresh_transformers_model_for_every_arch(hf_run):
    real = hf_run[1]
    for arch in B_ARCHS:
        shapes, _ = model_tensor_shapes(arch, 1000)
        names = engine.layout_names(get_layout("hf"), arch, 1000)
        ours = {names[k]: list(v) for k, v in shapes.items()}
        assert set(ours) == set(real[arch]), (arch, sorted(set(ours) ^ set(real[arch]))[:5])
        assert ours == real[arch], arch


def test_the_folder_holds_config_weights_processor_and_card(folders, fixture_ckpt):
    folder = folders / "b0-hf"
    assert {p.name for p in folder.iterdir()} == FOLDER_FILES
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["EfficientNetForImageClassification"] and config["model_type"] == "efficientnet"
    assert (config["width_coefficient"], config["depth_coefficient"], config["image_size"]) == (1.0, 1.0, 224)
    assert config["batch_norm_eps"] == 1e-3 and config["hidden_dim"] == 1280 and config["depthwise_padding"] == []
    assert config["num_labels"] == 1000 and config["id2label"]["0"] == "tench, Tinca tinca"
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    assert processor["crop_size"] == {"height": 224, "width": 224} and processor["size"] == {"shortest_edge": 256}
    assert processor["image_mean"] == [0.485, 0.456, 0.406] and processor["image_std"] == [0.229, 0.224, 0.225]
    assert processor["include_top"] is False and processor["do_center_crop"] is True
    card = json.loads((folder / "model.json").read_text())
    assert card["layout"] == "hf" and card["file_format"] == "safetensors"
    assert card["hf"]["create"].endswith("from_pretrained(folder)")
    assert any("7.5e-05" in note for note in card["hf"]["notes"])  # the measured parity, written down
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}  # from_pretrained refuses a file without it
    native = convert_checkpoint(fixture_ckpt, variant="standard").state_dict
    names = engine.layout_names(get_layout("hf"), "b0", 1000)
    state = read_weights(folder / "model.safetensors")
    assert set(state) == set(names.values()) and all(torch.equal(state[names[k]], v) for k, v in native.items())


def test_depthwise_padding_is_transformers_own_for_its_published_sizes():
    """The lists transformers' conversion script gives google/efficientnet-b1..b3 (odd sides at stride 2)."""
    assert hf.symmetric_stride2_blocks("b1", 240) == [16]
    assert hf.symmetric_stride2_blocks("b2", 260) == [5, 8, 16]
    assert hf.symmetric_stride2_blocks("b3", 300) == [5, 18]
    assert hf.symmetric_stride2_blocks("b0", 224) == []


def test_what_transformers_cannot_hold_is_refused_before_work(fixture_ckpt, tmp_path):
    out = tmp_path / "odd"
    result = _convert(fixture_ckpt, out, "--image-size", "225")
    assert result.exit_code == 2 and "--layout hf cannot hold efficientnet-b0 at 225px" in result.stderr
    assert "odd input size" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # no folder, no temporary
    with registered(), pytest.raises(UsageError, match="fix_stem_head True") as refused:
        hf.check_expressible("t1", 72)
    assert "activation" not in str(refused.value)  # relu6 is one transformers has
    assert "squeeze-excite not in every stage" in str(refused.value)


def test_folder_output_is_claimed_replaced_and_cleaned_like_a_file(fixture_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "b0-hf"
    assert _convert(fixture_ckpt, out).exit_code == 0
    again = _convert(fixture_ckpt, out)
    assert again.exit_code == 2 and "output exists" in again.stderr and "--force" in again.stderr
    before = (out / "model.json").stat().st_mtime_ns
    assert _convert(fixture_ckpt, out, "--force", "--dtype", "float16").exit_code == 0
    assert json.loads((out / "model.json").read_text())["dtype"] == "float16"
    assert (out / "model.json").stat().st_mtime_ns != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b0-hf"]  # the old folder and the temporary are gone
    # a failure while writing leaves the old folder as it was, and no temporary
    import safetensors.torch

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    failed = _convert(fixture_ckpt, out, "--force")
    assert failed.exit_code == 2 and "No space left on device" in failed.stderr
    assert json.loads((out / "model.json").read_text())["dtype"] == "float16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b0-hf"]


def test_folder_output_refusals(fixture_ckpt, tmp_path):
    as_file = _convert(fixture_ckpt, tmp_path / "b0.safetensors")
    assert as_file.exit_code == 2 and "writes a folder" in as_file.stderr
    theirs = tmp_path / "mine"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    forced = _convert(fixture_ckpt, theirs, "--force")
    assert forced.exit_code == 2 and "holds other files" in forced.stderr
    assert (theirs / "notes.txt").read_text() == "keep me"
    stale = tmp_path / ".b0-hf.999999999.abc.tmp"  # a dead writer's temporary folder
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    assert _convert(fixture_ckpt, tmp_path / "b0-hf").exit_code == 0
    assert not stale.exists()
