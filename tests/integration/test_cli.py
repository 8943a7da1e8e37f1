"""Bad input gives one clear line and exit 2, never a traceback, and nothing is written."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest

from effconv.errors import UsageError
from effconv.formats.bundle import TensorBundleReader
from effconv.models.efficientnet import model_tensor_shapes
from tests.support.helpers import run_cli


def copy_fixture(fixture_ckpt: Path, dest: Path) -> Path:
    shutil.copytree(fixture_ckpt, dest)
    return dest


def assert_clean_failure(result, needle: str, code: int = 2):
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("effconv: error: "), result.stderr
    assert "Traceback" not in result.output
    assert needle in lines[0], lines[0]


def test_missing_path(tmp_path):
    result = run_cli("convert", "--src", tmp_path / "nope", "--out", tmp_path / "x.pth")
    assert_clean_failure(result, "nope")
    assert not list(tmp_path.iterdir())


def test_not_a_checkpoint(tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "model.ckpt.index").write_bytes(os.urandom(300))
    (junk / "model.ckpt.data-00000-of-00001").write_bytes(os.urandom(300))
    result = run_cli("convert", "--src", junk, "--out", tmp_path / "x.pth")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert not (tmp_path / "x.pth").exists()


def test_empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_cli("convert", "--src", tmp_path / "empty", "--out", tmp_path / "x.pth")
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_wrong_arch_names_both(fixture_ckpt, tmp_path):
    result = run_cli("convert", "--src", fixture_ckpt, "--arch", "b5", "--out", tmp_path / "x.pth")
    assert_clean_failure(result, "--arch b5 given, but the checkpoint holds b0")
    assert not (tmp_path / "x.pth").exists()


def test_arch_by_its_official_name(fixture_ckpt, tmp_path):
    result = run_cli("convert", "--src", fixture_ckpt, "--arch", "EfficientNet-B0", "--out", tmp_path / "x.pth", "-q")
    assert result.exit_code == 0, result.stderr
    card = json.loads((tmp_path / "x.json").read_text())
    assert (card["arch"], card["family"]) == ("b0", "efficientnet")
    result = run_cli("convert", "--src", fixture_ckpt, "--arch", "efficientnet-b5", "--out", tmp_path / "y.pth")
    assert_clean_failure(result, "--arch b5 given, but the checkpoint holds b0")


def test_crc_mismatch(fixture_ckpt, tmp_path):
    ckpt = copy_fixture(fixture_ckpt, tmp_path / "ckpt")
    with TensorBundleReader(ckpt / "model.ckpt") as reader:
        info = reader.info("efficientnet-b0/head/dense/kernel/ExponentialMovingAverage")
    data = ckpt / "model.ckpt.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[info.offset + 1000] ^= 0x40
    data.write_bytes(bytes(raw))
    result = run_cli("convert", "--src", ckpt, "--out", tmp_path / "x.pth")
    assert_clean_failure(result, "crc32c")
    assert not (tmp_path / "x.pth").exists()


def test_truncated_data_file(fixture_ckpt, tmp_path):
    ckpt = copy_fixture(fixture_ckpt, tmp_path / "ckpt")
    data = ckpt / "model.ckpt.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    result = run_cli("convert", "--src", ckpt, "--out", tmp_path / "x.pth")
    assert_clean_failure(result, "model.ckpt.data-00000-of-00001")


def test_output_exists_and_force(fixture_ckpt, tmp_path):
    out = tmp_path / "b0.pth"
    out.write_bytes(b"precious")
    result = run_cli("convert", "--src", fixture_ckpt, "--out", out)
    assert_clean_failure(result, "output exists")
    assert out.read_bytes() == b"precious"
    assert run_cli("convert", "--src", fixture_ckpt, "--out", out, "--force", "-q").exit_code == 0
    assert out.stat().st_size > 1_000_000 and out.with_suffix(".json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b0.json", "b0.pth"]  # no temporary left


def test_failed_forced_overwrite_keeps_old_output(fixture_ckpt, tmp_path):
    out = tmp_path / "b0.pth"
    out.write_bytes(b"precious")
    result = run_cli("convert", "--src", fixture_ckpt, "--arch", "b3", "--out", out, "--force")
    assert result.exit_code == 2
    assert out.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b0.pth"]


def test_output_directory_missing(fixture_ckpt, tmp_path):
    result = run_cli("convert", "--src", fixture_ckpt, "--out", tmp_path / "no" / "b0.pth")
    assert_clean_failure(result, "output directory does not exist")


def test_bad_output_suffix(fixture_ckpt, tmp_path):
    assert_clean_failure(run_cli("convert", "--src", fixture_ckpt, "--out", tmp_path / "b0.bin"), "--out must end")


@pytest.mark.parametrize("as_json", [False, True])
def test_inspect(fixture_ckpt, as_json):
    result = run_cli("inspect", "--src", fixture_ckpt, *(["--json"] if as_json else []))
    assert result.exit_code == 0, result.output
    if as_json:
        report = json.loads(result.stdout)
        assert report["arch"] == "b0" and report["num_classes"] == 1000 and report["variables"] == 623
        assert report["ema"] == "complete" and report["unknown_variables"] == [] and report["missing"] == []
        shapes, _ = model_tensor_shapes("b0", 1000)
        floats = sum(math.prod(s) for k, s in shapes.items() if not k.endswith("num_batches_tracked"))
        assert report["bytes"] == 2 * 4 * floats + 8  # raw + EMA float32 copies, int64 global_step
    else:
        assert "b0" in result.stdout and "EMA:         complete" in result.stdout


def test_inspect_missing_path(tmp_path):
    assert_clean_failure(run_cli("inspect", "--src", tmp_path / "nope"), "nope")


def test_help_answers_questions():
    result = run_cli("convert", "--help")
    for word in ("--ema", "auto", "EMA", "--variant", "advprop", "--force", ".tar.gz"):
        assert word in result.output
    assert "--weights" not in result.output  # the deprecated name of --ema: hidden


def test_ema_chooses_the_copy_converted(fixture_ckpt, tmp_path):
    out = tmp_path / "raw.pth"
    result = run_cli("convert", "--src", fixture_ckpt, "--out", out, "--ema", "raw", "-q", "--variant", "standard")
    assert result.exit_code == 0 and result.stderr == "", result.output
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["weights"] == "raw" and card["weights_policy"] == "raw"


def test_convert_weights_is_the_deprecated_name_of_ema(fixture_ckpt, tmp_path):
    out = tmp_path / "raw.pth"
    result = run_cli("convert", "--src", fixture_ckpt, "--out", out, "--weights", "raw", "-q", "--variant", "standard")
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == ["effconv: warning: convert --weights is deprecated: use --ema raw"]
    assert json.loads(out.with_suffix(".json").read_text())["weights"] == "raw"


def test_ema_and_its_deprecated_name_must_agree(fixture_ckpt, tmp_path):
    result = run_cli("convert", "--src", fixture_ckpt, "--out", tmp_path / "x.pth", "--ema", "ema", "--weights", "raw")
    assert_clean_failure(result, "--ema ema contradicts --weights raw, its deprecated name")
    assert not list(tmp_path.iterdir())
    result = run_cli("verify", "--src", fixture_ckpt, "--ema", "raw", "--weights-policy", "ema")
    assert_clean_failure(result, "--ema raw contradicts --weights-policy ema")


def test_verify_weights_policy_is_the_deprecated_name_of_ema(fixture_ckpt, monkeypatch):
    seen = {}

    def stop(src, artifact, **options):  # the comparison itself is tests/integration/test_verify.py's
        seen.update(options)
        raise UsageError("stopped before TensorFlow")

    monkeypatch.setattr("effconv.parity.verify.verify", stop)
    result = run_cli("verify", "--src", fixture_ckpt, "--weights-policy", "raw", "-q")
    assert result.stderr.splitlines()[0] == "effconv: warning: verify --weights-policy is deprecated: use --ema raw"
    assert seen["ema"] == "raw"
    run_cli("verify", "--src", fixture_ckpt, "--ema", "ema", "-q")
    assert seen["ema"] == "ema"
    assert "--weights-policy" not in run_cli("verify", "--help").output


def test_choice_lists_are_the_librarys_tables():
    from effconv.cli import main
    from effconv.convert import DTYPES
    from effconv.ema_policy import POLICIES
    from effconv.mappings.layouts import LAYOUT_NAMES
    from effconv.models.spec import ARCH_NAMES, OFFICIAL_NAMES
    from effconv.variants import VARIANTS
    from effconv.zoo.evaluation import AMP_DTYPES

    tables = {
        "arch": ARCH_NAMES,
        "variant": tuple(VARIANTS),
        "layout": LAYOUT_NAMES,
        "dtype": tuple(DTYPES),
        "ema": POLICIES,
        "old_ema": POLICIES,
        "amp": tuple(AMP_DTYPES),
    }
    for name, command in main.commands.items():
        for param in command.params:
            if isinstance(param.type, click.Choice):
                assert param.name in tables, f"effconv {name} --{param.name}: which table are its choices?"
                choices = tuple(param.type.choices)
                if param.name == "arch" and len(choices) > len(ARCH_NAMES):  # the official names are taken too
                    assert choices == (*ARCH_NAMES, *OFFICIAL_NAMES), f"effconv {name} --arch"
                    continue
                assert choices == tuple(tables[param.name]), f"effconv {name} --{param.name}"


def test_the_cli_offers_its_choices_without_importing_torch():
    code = "import sys, effconv.cli; print(sorted(m for m in ('torch', 'numpy', 'tensorflow') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_a_bug_while_writing_is_no_disk_problem(fixture_ckpt, tmp_path, monkeypatch):
    """Only OSError (and safetensors' I/O error) means a failed write; a bug keeps its traceback."""

    def bug(path):
        raise TypeError("a bug in the write path")

    monkeypatch.setattr("effconv.output.artifact._seal", bug)
    with pytest.raises(TypeError, match="a bug in the write path"):
        run_cli("convert", "--src", fixture_ckpt, "--out", tmp_path / "b0.pth", "-q")
    assert not list(tmp_path.iterdir())  # the artifact is discarded all the same


def test_list_explains_an_empty_result():
    result = run_cli("list", "--arch", "b8", "--variant", "standard")
    assert result.exit_code == 0
    expected = "no catalogue row matches --arch b8 --variant standard: b8 is released as advprop only"
    assert result.stdout.strip() == expected  # not a bare table header
    as_json = run_cli("list", "--arch", "l2", "--variant", "advprop", "--json")
    assert json.loads(as_json.stdout) == [] and "l2 is released as noisystudent only" in as_json.stderr


def _tf_noise(verbose: bool, out: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    from effconv.parity.quiet_tensorflow import is_noise

    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")}
    args = ["synth", "--arch", "b0", "--num-classes", "10", "--out", str(out), *(["--verbose"] if verbose else [])]
    done = subprocess.run([sys.executable, "-m", "effconv.cli", *args], capture_output=True, text=True, env=env)
    return done, [line for line in done.stderr.splitlines() if is_noise(line)]


def test_synth_silences_tensorflow_start_up_lines_unless_verbose(tmp_path):
    done, noise = _tf_noise(False, tmp_path / "quiet")
    assert done.returncode == 0 and noise == [], done.stderr
    assert "absl::InitializeLog" not in done.stderr and "oneDNN custom operations" not in done.stderr
    assert done.stderr.splitlines()[0].startswith("drawing the EMA weights")  # synth's own progress is kept
    done, noise = _tf_noise(True, tmp_path / "verbose")
    assert done.returncode == 0 and any("absl::InitializeLog" in line for line in noise), done.stderr
