"""Issue 3 acceptance: effconv verify proves parity, and finds the first divergent layer when there is none."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch

from effconv.models import load
from tests.support.helpers import max_abs, nchw, run_cli, tolerance


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, fixture_ckpt):
    out = tmp_path_factory.mktemp("verify") / "b0.pth"
    assert run_cli("convert", "--src", fixture_ckpt, "--out", out, "-q", "--variant", "standard").exit_code == 0
    return out


def test_fixture_verifies_with_reports(fixture_ckpt, artifact, tmp_path):
    reports = [tmp_path / f"parity.{s}" for s in ("json", "md", "xml", "png")]
    args = ["verify", "--src", fixture_ckpt, "--weights", artifact, "--input-size", "224", "--input-size", "97"]
    result = run_cli(*args, *[a for r in reports for a in ("--report", r)])
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output
    data = json.loads(reports[0].read_text())
    assert data["passed"] and data["weights"] == "ema" and len(data["cases"]) == 2
    assert data["versions"]["tensorflow"] and data["source_sha256"]["model.ckpt.index"]
    for case in data["cases"]:
        assert case["logits"]["max_abs"] <= tolerance(case["logits"]["ref_absmax"]) and case["top1_agreement"] == 1.0
    suite = ET.parse(reports[2]).getroot().find("testsuite")
    assert suite.get("tests") == "2" and suite.get("failures") == "0" and len(suite.findall("testcase")) == 2
    assert "2 passed, 0 failed" in reports[1].read_text()
    import matplotlib.image

    assert reports[3].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and matplotlib.image.imread(reports[3]).ndim == 3


def test_per_layer_figures_agree_with_official_endpoints(fixture_ckpt, artifact, oracle, endpoints, tmp_path):
    np.savez(tmp_path / "x.npz", x=oracle["x"])
    report = tmp_path / "r.json"
    args = ["verify", "--src", fixture_ckpt, "--weights", artifact, "--inputs", tmp_path / "x.npz"]
    result = run_cli(*args, "--per-layer", "--report", report)
    assert result.exit_code == 0, result.output
    (case,) = json.loads(report.read_text())["cases"]
    figures = {layer["name"]: layer["max_abs"] for layer in case["layers"]}
    scales = {layer["name"]: layer["ref_absmax"] for layer in case["layers"]}
    model = load(artifact)
    with torch.no_grad():
        ours = model.forward_endpoints(nchw(oracle["x"]))
    for name, ref in endpoints.items():
        if name == "features":
            continue
        got = ours[name].numpy()
        direct = max_abs(got.transpose(0, 2, 3, 1) if got.ndim == 4 else got, ref)
        # The TF reference agrees with the official endpoints within tolerance(ref), so the figures differ by less.
        assert abs(figures[name] - direct) <= tolerance(ref), name
    assert figures["logits"] <= tolerance(scales["logits"])


def _broken(artifact, tmp_path, key, change):
    state = torch.load(artifact, weights_only=True)
    state[key] = change(state[key])
    out = tmp_path / "broken.pth"
    torch.save(state, out)
    out.with_suffix(".json").write_text(artifact.with_suffix(".json").read_text())
    return out


@pytest.mark.parametrize(
    "key,change,block",
    [
        ("blocks.5.dw_bn.running_var", lambda t: torch.ones_like(t), "block_5"),
        ("blocks.9.dw_conv.weight", lambda t: t.transpose(2, 3).contiguous(), "block_9"),
        ("blocks.12.project_conv.weight", lambda t: t.flip(0), "block_12"),
    ],
)
def test_broken_artifact_fails_and_names_the_block(fixture_ckpt, artifact, tmp_path, key, change, block):
    broken = _broken(artifact, tmp_path, key, change)
    report = tmp_path / "r.json"
    result = run_cli(
        "verify", "--src", fixture_ckpt, "--weights", broken, "--report", report, "--report", tmp_path / "r.xml"
    )
    assert result.exit_code == 1, result.output
    assert result.stdout.splitlines()[-1].startswith("FAIL: ") and f"first diverges at {block}" in result.stdout
    data = json.loads(report.read_text())
    assert not data["passed"] and data["cases"][0]["first_divergent"] == block
    assert ET.parse(tmp_path / "r.xml").getroot().find("testsuite").get("failures") == "1"


def test_in_memory_conversion_and_odd_size(fixture_ckpt):
    result = run_cli("verify", "--src", fixture_ckpt, "--input-size", "131", "--batch", "1", "-q")
    assert result.exit_code == 0, result.output


def test_verify_usage_errors(fixture_ckpt, artifact, tmp_path):
    bad_report = run_cli("verify", "--src", fixture_ckpt, "--report", tmp_path / "r.txt")
    assert bad_report.exit_code == 2 and "suffix" in bad_report.stderr
    missing = run_cli("verify", "--src", tmp_path / "nope", "--weights", artifact)
    assert missing.exit_code == 2 and "Traceback" not in missing.output
    np.save(tmp_path / "bad.npy", np.zeros((2, 3, 8, 8), np.float32))
    bad_inputs = run_cli("verify", "--src", fixture_ckpt, "--inputs", tmp_path / "bad.npy")
    assert bad_inputs.exit_code == 2 and "NHWC" in bad_inputs.stderr


def test_real_images_report_preprocessing_and_model_separately(fixture_ckpt, artifact, tmp_path):
    from PIL import Image
    from skimage import data

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(data.astronaut()[40:400, :480]).save(images / "astronaut.png")
    Image.fromarray(data.coffee()).save(images / "coffee.jpg", quality=90)
    report = tmp_path / "r.json"
    args = ["verify", "--src", fixture_ckpt, "--weights", artifact, "--images", images, "--report", report]
    # Random weights turn smooth natural images into logits of ~4000: judge those relative to max |logit|.
    result = run_cli(*args, "--input-size", "97", "--rtol", "1e-3")
    assert result.exit_code == 0, result.output
    cases = {c["name"]: c for c in json.loads(report.read_text())["cases"]}
    assert set(cases) == {"b0@97", "b0:astronaut.png", "b0:coffee.jpg"}
    # Preprocessed pixels have a known scale, 0-255: an absolute 1e-3 is 4e-6 of it (measured: 0).
    png = cases["b0:astronaut.png"]
    assert png["input_size"] == [224, 224] and png["preprocessing_max_abs"] <= 1e-3  # PNG: same pixels, same resize
    assert cases["b0:coffee.jpg"]["preprocessing_max_abs"] <= 1e-3  # JPEG: decoded like TF's libjpeg (fast IDCT)
    # Relative to max |logit| as asked above (measured on an AMD EPYC: up to 2.2e-4 with oneDNN on, 7.5e-5 off).
    assert all(c["logits"]["max_rel"] <= 1e-3 and c["top1_agreement"] == 1.0 for c in cases.values())


def _tensorflow_must_not_start(monkeypatch):
    def too_late(*args, **kwargs):
        raise AssertionError("an argument error must come before TensorFlow and the conversion")

    monkeypatch.setattr("effconv.parity.quiet_tensorflow.import_tensorflow", too_late)
    monkeypatch.setattr("effconv.parity.verify._torch_side", too_late)


def test_weights_of_another_arch_are_named_before_tensorflow(fixture_ckpt, artifact, tmp_path, monkeypatch):
    _tensorflow_must_not_start(monkeypatch)
    b3 = tmp_path / "b3-ap.pth"
    b3.write_bytes(artifact.read_bytes())
    card = json.loads(artifact.with_suffix(".json").read_text())
    b3.with_suffix(".json").write_text(json.dumps({**card, "arch": "b3", "variant": "advprop"}))
    result = run_cli("verify", "--src", fixture_ckpt, "--weights", b3)
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert "holds efficientnet-b3 weights" in line and "is efficientnet-b0" in line and "--arch" not in line


def _arguments_cases(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "cat.jpg").write_bytes(b"\xff\xd8\xff" + b"not a jpeg" * 30)
    return {
        "empty": (["--images", tmp_path / "empty"], "no .jpg/.jpeg/.png files"),
        "fake": (["--images", tmp_path / "fake"], f"cannot read image {tmp_path / 'fake' / 'cat.jpg'}"),
        "suffix": (["--report", tmp_path / "x.html"], "the suffix must be one of"),
        "folder": (["--report", tmp_path / "no" / "r.json"], "directory does not exist"),
    }


def test_arguments_are_checked_before_torch_and_tensorflow_load(fixture_ckpt, tmp_path):
    """In a fresh process: each bad argument fails before torch (let alone TensorFlow) is imported."""
    import subprocess
    import sys

    program = (
        "import sys\nfrom effconv.cli import main\ntry:\n    main(sys.argv[1:], standalone_mode=False)\n"
        "except SystemExit as e:\n    print('exit', e.code)\n"
        "print('loaded', sorted(m for m in ('torch', 'tensorflow') if m in sys.modules))\n"
    )
    for name, (args, needle) in _arguments_cases(tmp_path).items():
        argv = ["verify", "--src", str(fixture_ckpt), *map(str, args)]
        done = subprocess.run([sys.executable, "-c", program, *argv], capture_output=True, text=True, timeout=120)
        assert done.stdout.splitlines() == ["exit 2", "loaded []"], (name, done.stdout, done.stderr)
        (line,) = done.stderr.strip().splitlines()
        assert line.startswith("effconv: error: ") and needle in line and "BytesIO" not in line, (name, line)


def _without_tf_log_settings() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")}


def test_quiet_verify_prints_the_verdict_on_stdout_and_no_tensorflow_noise(fixture_ckpt):
    import subprocess
    import sys

    from effconv.parity.quiet_tensorflow import is_noise

    args = ["verify", "--src", str(fixture_ckpt), "--input-size", "64", "--batch", "1", "-q"]
    done = subprocess.run(
        [sys.executable, "-m", "effconv.cli", *args], capture_output=True, text=True, env=_without_tf_log_settings()
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["PASS: efficientnet-b0, 1 case(s) within tolerance"]
    assert done.stderr == "", done.stderr
    assert not any(is_noise(line) for line in done.stderr.splitlines())


def test_a_report_never_overwrites_the_model_card(fixture_ckpt, artifact):
    card = artifact.with_suffix(".json")
    before = card.read_bytes()
    result = run_cli("verify", "--src", fixture_ckpt, "--weights", artifact, "--report", card)
    assert result.exit_code == 2 and "would overwrite the weights or their model card" in result.output
    assert card.read_bytes() == before
