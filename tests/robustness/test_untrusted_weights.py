"""Issue 6 item 4: a .pth is untrusted input. effconv never unpickles code (weights_only=True or safetensors).

A .pth whose unpickling would create a marker file is refused with exit 2, and the marker never appears,
through the Python API and through `effconv verify --weights`, even with torch told to drop weights_only
wherever the caller leaves it unset. A scan of the sources keeps every loader that way.
"""

from __future__ import annotations

import ast
import io
import json
import os
import random
import shlex
import zipfile
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


def _mutations(raw: bytes, seed: int, count: int):
    """Truncations and byte flips of `raw`, seeded."""
    rng = random.Random(seed)
    yield b""
    for cut in sorted(rng.sample(range(1, len(raw)), 40)):
        yield raw[:cut]
    for _ in range(count):
        data = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        yield bytes(data)


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch warns of the odd pickle protocols damage makes
@pytest.mark.parametrize("kind", ["zip", "legacy", "zip-pickle", "safetensors"])
def test_damaged_weights_are_refused_and_never_a_traceback(tmp_path, kind):
    """read_weights catches what torch.load and safetensors raise for a damaged file, and nothing more."""
    from safetensors.torch import save_file

    from effconv.output.artifact import read_weights

    state = {"a": torch.randn(16, 3), "b": torch.arange(10), "c": torch.randn(5).half(), "n": torch.tensor(0)}
    source = tmp_path / ("w.safetensors" if kind == "safetensors" else "w.pth")
    if kind == "safetensors":
        save_file(state, source)
    else:
        torch.save(state, source, _use_new_zipfile_serialization=kind != "legacy")
    raw = source.read_bytes()
    if kind == "zip-pickle":  # damage the pickle inside an intact zip, where the zip itself would not notice
        with zipfile.ZipFile(source) as z:
            records = {info.filename: z.read(info.filename) for info in z.infolist()}
        pickle_name = next(n for n in records if n.endswith("data.pkl"))
        damaged = []
        for data in _mutations(records[pickle_name], 1, 300):
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w") as z:
                for name, record in records.items():
                    z.writestr(name, data if name == pickle_name else record)
            damaged.append(buf.getvalue())
    else:
        damaged = list(_mutations(raw, 0, 300))
    path = tmp_path / f"damaged{source.suffix}"
    refused = 0
    for data in damaged:
        path.write_bytes(data)
        try:
            read_weights(path)
        except UsageError as e:
            assert f"cannot load {path}" in str(e) or "does not hold a state dict" in str(e), str(e)
            assert "\n" not in str(e)
            refused += 1
    assert refused > len(damaged) // 2  # the damage was real
