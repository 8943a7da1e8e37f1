"""Issue 6 item 4: a .pth is untrusted input. effconv never unpickles code (weights_only=True or safetensors).

A .pth whose unpickling would create a marker file is refused with exit 2, and the marker never appears,
through the Python API and through `effconv verify --weights`, even with torch told to drop weights_only
wherever the caller leaves it unset. A scan of the sources keeps every loader that way.
"""

from __future__ import annotations

import ast
import json
import os
import shlex
from pathlib import Path

import pytest
import torch

from effconv.errors import UsageError
from tests.support.helpers import run_cli

PROJECT = Path(__file__).resolve().parents[2]
SOURCE_DIRS = ("converter", "models", "mappings", "scripts")


class RunsCode:
    """Unpickling this runs a shell command: what a hostile .pth does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.fixture(params=["zip", "legacy"])
def malicious(request, tmp_path, monkeypatch) -> tuple[Path, Path]:
    """(weights, marker): a b0-looking .pth in torch's zip or legacy format, with a valid card beside it."""
    marker = tmp_path / "code-ran"
    weights = tmp_path / "b0.pth"
    payload = {"stem_conv.weight": torch.zeros(32, 3, 3, 3), "stem_bn.weight": RunsCode(marker)}
    torch.save(payload, weights, _use_new_zipfile_serialization=request.param == "zip")
    torch.load(weights, weights_only=False)  # the control: loading it unsafely does run the code
    assert marker.exists()
    marker.unlink()
    card = {"arch": "b0", "num_classes": 1000, "layout": "native", "image_size": 224, "weights": "ema"}
    weights.with_suffix(".json").write_text(json.dumps(card))
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # only explicit weights_only=True resists this
    return weights, marker


def test_load_refuses_a_malicious_pickle(malicious):
    from effconv.models import load
    from effconv.output.artifact import read_weights

    weights, marker = malicious
    for loader in (load, read_weights):
        with pytest.raises(UsageError, match=f"cannot load {weights}") as e:
            loader(weights)
        assert e.value.exit_code == 2 and "\n" not in str(e.value)
    assert not marker.exists()


def test_verify_refuses_a_malicious_pickle(malicious, fixture_ckpt):
    weights, marker = malicious
    result = run_cli("verify", "--src", fixture_ckpt, "--weights", weights, "-q")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"effconv: error: cannot load {weights}"), result.stderr
    assert not marker.exists()


def unsafe_loads(tree: ast.AST) -> list[str]:
    """Calls in `tree` that could run pickled code."""
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        call = ast.unparse(node.func)  # the dotted name as written: torch.load, np.load, torch.jit.load
        keywords = {k.arg: k.value for k in node.keywords}

        def is_true(name: str, keywords=keywords) -> bool:
            value = keywords.get(name)
            return isinstance(value, ast.Constant) and value.value is True

        if call == "torch.load" and not is_true("weights_only"):
            found.append(f"line {node.lineno}: torch.load without weights_only=True")
        elif call in ("pickle.load", "pickle.loads", "dill.load", "joblib.load", "marshal.loads", "torch.jit.load"):
            found.append(f"line {node.lineno}: {call}")
        elif call == "np.load" and is_true("allow_pickle"):
            found.append(f"line {node.lineno}: np.load with allow_pickle=True")
    return found


def test_every_loader_in_effconv_is_safe():
    sources = [p for d in SOURCE_DIRS for p in sorted((PROJECT / d).rglob("*.py"))]
    assert len(sources) > 20
    problems = {str(p.relative_to(PROJECT)): unsafe_loads(ast.parse(p.read_text())) for p in sources}
    assert {k: v for k, v in problems.items() if v} == {}
    unsafe = "torch.load(f)\nnp.load(f, allow_pickle=True)\npickle.loads(b)\ntorch.jit.load(f)"
    assert len(unsafe_loads(ast.parse(unsafe))) == 4  # the scan itself works
    assert unsafe_loads(ast.parse("torch.load(f, map_location='cpu', weights_only=True)\nnp.load(f)")) == []
