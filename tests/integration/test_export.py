"""`effconv export`: ONNX with TF 'SAME' padding fixed for one size, checked with onnxruntime."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from effconv.errors import OutputError, UsageError
from effconv.models import load
from effconv.output import export as export_module
from tests.support.helpers import assert_close, run_cli


@pytest.fixture(scope="module")
def weights(tmp_path_factory, fixture_ckpt):
    out = tmp_path_factory.mktemp("export") / "b0.pth"
    assert run_cli("convert", "--src", fixture_ckpt, "--out", out, "-q", "--variant", "standard").exit_code == 0
    return out


def _onnxruntime_and_torch(onnx_path, weights, size: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(42))
    (got,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        expected = load(weights)(x).numpy()
    return got, expected


@pytest.mark.parametrize("size", [224, 225])  # even: asymmetric stride-2 padding; odd: symmetric
def test_export_matches_pytorch_in_onnxruntime(weights, tmp_path, size):
    out = tmp_path / f"b0-{size}.onnx"
    result = run_cli("export", "--weights", weights, "--onnx", out, "--input-size", size)
    assert result.exit_code == 0, result.output
    assert "onnxruntime vs PyTorch: max |diff|" in result.output
    graph = onnx.load(str(out)).graph
    dims = [d.dim_value or d.dim_param for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == [3, size, size] and isinstance(dims[0], str)  # the batch stays free
    assert "Pad" not in {n.op_type for n in graph.node}  # padding is constant, inside each Conv
    got, expected = _onnxruntime_and_torch(out, weights, size, batch=3)
    diff, limit = assert_close(got, expected, what=f"onnxruntime vs PyTorch at {size}")
    print(f"b0 at {size}: onnxruntime vs PyTorch max |diff| = {diff:.3g} (limit {limit:.3g})")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_export_defaults_to_the_card_size_and_refuses_to_overwrite(weights, tmp_path):
    out = tmp_path / "b0.onnx"
    assert run_cli("export", "--weights", weights, "--onnx", out, "--no-check").exit_code == 0
    dims = [d.dim_value for d in onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim]
    assert dims[2:] == [224, 224]
    again = run_cli("export", "--weights", weights, "--onnx", out, "--no-check")
    assert again.exit_code == 2 and "--force" in again.stderr


@pytest.mark.parametrize("name", ["b0.onx", "missing-dir/b0.onnx"])
def test_bad_output_paths_are_usage_errors(weights, tmp_path, name):
    result = run_cli("export", "--weights", weights, "--onnx", tmp_path / name)
    assert result.exit_code == 2 and result.stderr.startswith("effconv: error:")


def test_parity_failure_exits_1_and_writes_nothing(weights, tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "_check_with_onnxruntime", lambda *args: (0.5, 10.0))
    out = tmp_path / "b0.onnx"
    result = run_cli("export", "--weights", weights, "--onnx", out, "--input-size", 64)
    assert result.exit_code == 1 and "0.5" in result.stderr
    assert list(tmp_path.iterdir()) == []


class _ProgramOnAFullDisk:
    model = SimpleNamespace(metadata_props={})

    def save(self, path):
        path.write_bytes(b"half a model")
        raise OSError(28, "No space left on device")


def test_a_failed_write_is_an_output_error_and_leaves_nothing(tmp_path, monkeypatch):
    from effconv.models import create_model

    monkeypatch.setattr(export_module, "_export", lambda *args: _ProgramOnAFullDisk())
    with pytest.raises(OutputError, match=r"cannot write .*b0.onnx: No space left on device"):
        export_module.export_model(create_model("b0", num_classes=10), tmp_path / "b0.onnx", 32, check=False)
    assert list(tmp_path.iterdir()) == []  # the staging folder is gone too


def test_only_the_exporters_own_errors_are_a_failed_export(tmp_path, monkeypatch):
    from effconv.models import create_model

    def exporter_gives_up(*args, **kwargs):
        raise torch.onnx.OnnxExporterError("Failed to export the model with torch.export.\n\n## Long report")

    def bug(*args, **kwargs):
        raise AttributeError("a bug, not a failed export")

    model = create_model("b0", num_classes=10)
    monkeypatch.setattr(torch.onnx, "export", exporter_gives_up)
    with pytest.raises(
        OutputError, match=r"^ONNX export failed: Failed to export the model with torch.export. \.\.\.$"
    ):
        export_module.export_model(model, tmp_path / "b0.onnx", 32, check=False)
    monkeypatch.setattr(torch.onnx, "export", bug)
    with pytest.raises(AttributeError, match="a bug"):
        export_module.export_model(model, tmp_path / "b0.onnx", 32, check=False)
    assert list(tmp_path.iterdir()) == []


def test_onnx_carries_the_card_and_export_shows_progress(weights, tmp_path):
    out = tmp_path / "b0.onnx"
    result = run_cli("export", "--weights", weights, "--onnx", out, "--input-size", "64")
    assert result.exit_code == 0, result.output
    steps = result.stderr.splitlines()
    assert any("exporting efficientnet-b0 at 64 px with torch.export" in s for s in steps), result.stderr
    assert any("checking with onnxruntime" in s for s in steps) and all(s.startswith("[") for s in steps)
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    card = json.loads(weights.with_suffix(".json").read_text())
    assert json.loads(meta["mean"]) == card["preprocessing"]["mean"] and meta["image_size"] == "64"
    assert json.loads(meta["std"]) == card["preprocessing"]["std"] and meta["num_classes"] == "1000"
    names = json.loads(meta["class_names"])
    assert len(names) == 1000 and names[0].startswith("tench")
    assert json.loads(meta["effconv.card"]) == card and meta["crop_padding"] == "32"
    quiet = run_cli(
        "export", "--weights", weights, "--onnx", tmp_path / "q.onnx", "--no-check", "-q", "--input-size", 8
    )
    assert quiet.exit_code == 0 and quiet.stderr == ""


def test_the_status_line_ticks_on_a_terminal(monkeypatch, capsys):
    import sys
    import time

    from effconv import cli

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.setattr(cli._StatusLine, "TICK_SECONDS", 0.02)
    status = cli._StatusLine(quiet=False)
    status("exporting")
    time.sleep(0.3)  # a step that takes a while: the line is redrawn meanwhile
    status.close()
    drawn = capsys.readouterr().err
    assert drawn.count("exporting") >= 3 and drawn.endswith("\r\033[K")


def test_condconv_models_are_refused_with_the_reason(tmp_path):
    from effconv.models import create_model
    from effconv.output.export import export_model

    with pytest.raises(UsageError, match="CondConv models do not export to ONNX"):
        export_model(create_model("condconv-b0-4e", 10), tmp_path / "cc.onnx", 64)
    assert list(tmp_path.iterdir()) == []
