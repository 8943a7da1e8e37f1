"""Issue 11 §3: the README's examples run as written.

Every fenced block of README.md right after a `<!-- readme-test -->` line runs here, in README order, in one
temporary folder (so a later block finds the files an earlier one wrote): shell blocks with bash and the
`effconv` of the main venv, Python blocks with the main venv's Python, or `.venv-timm`'s for blocks marked
`<!-- readme-test: .venv-timm -->` (timm, mmpretrain). The one substitution: `efficientnet-b0/` (an official
checkpoint folder as downloaded) is the official-b0 fixture. Python blocks get `x`, the fixture's oracle input
(NCHW, normalised), and whatever `logits` they compute is checked against the fixture's EMA logits.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import PROJECT_ROOT
from tests.support.helpers import assert_close, max_abs

README = PROJECT_ROOT / "README.md"
MARKED = re.compile(r"^<!-- readme-test(?:: (?P<env>\S+))? -->\n```(?P<lang>\w+)\n(?P<code>.*?)^```$", re.M | re.S)
SUBSTITUTIONS = {"efficientnet-b0/": "{fixture_ckpt}/"}
PYTHONS = {None: Path(sys.executable), ".venv-timm": PROJECT_ROOT / ".venv-timm" / "bin" / "python"}
PRELUDE = """import numpy as np, torch
x = torch.from_numpy(np.ascontiguousarray(np.load({oracle!r})["x"].transpose(0, 3, 1, 2)))
"""
WEIGHTS_FILE = re.compile(r"""["'](b0[\w-]*\.(?:pth|safetensors))["']""")  # the file a Python block loads
UNIT_ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8}
EPILOGUE = """
if "logits" in globals():
    np.save({out!r}, torch.as_tensor(logits).detach().float().numpy())
"""


def readme_blocks() -> list[tuple[str | None, str, str]]:
    """(environment, language, code) of every marked block, in README order."""
    return [(m["env"], m["lang"], m["code"]) for m in MARKED.finditer(README.read_text())]


def _substituted(code: str, fixture_ckpt: Path) -> str:
    for text, value in SUBSTITUTIONS.items():
        code = code.replace(text, value.format(fixture_ckpt=fixture_ckpt))
    return code


def test_readme_marks_its_runnable_examples():
    blocks = readme_blocks()
    assert [lang for _, lang, _ in blocks].count("bash") >= 1 and [lang for _, lang, _ in blocks].count("python") >= 3
    assert {env for env, _, _ in blocks} <= set(PYTHONS)


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory, fixture_ckpt, fixture_dir):
    """Run every marked block; returns the folder and, per Python block, (the file it loads, its logits or None)."""
    if not PYTHONS[".venv-timm"].is_file():
        pytest.fail(f"{PYTHONS['.venv-timm']} missing: run scripts/bootstrap.sh (CI does) to create .venv-timm")
    work = tmp_path_factory.mktemp("readme")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    results = []
    for i, (venv, lang, code) in enumerate(readme_blocks()):
        code = _substituted(code, fixture_ckpt)
        if lang == "bash":
            command = ["bash", "-e", "-u", "-o", "pipefail", "-c", code]
        else:
            script = work / f"block{i}.py"
            out = work / f"block{i}-logits.npy"
            prelude = PRELUDE.format(oracle=str(fixture_dir / "oracle.npz"))
            script.write_text(prelude + code + EPILOGUE.format(out=str(out)))
            command = [str(PYTHONS[venv]), str(script)]
        proc = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (
            f"README block {i} ({lang}) failed:\n{code}\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
        )
        if lang == "python":
            loaded = WEIGHTS_FILE.search(code)
            results.append((loaded and loaded[1], np.load(out) if out.is_file() else None))
    return work, results


def test_readme_examples_run_and_give_the_official_logits(readme_run, oracle):
    work, results = readme_run
    assert (work / "b0.pth").is_file() and (work / "b0-timm.safetensors").is_file() and (work / "b0-mm.pth").is_file()
    checked = [(name, got) for name, got in results if got is not None]
    assert len(checked) >= 3 and all(name for name, _ in checked)
    for name, got in checked:
        dtype = json.loads((work / name).with_suffix(".json").read_text())["dtype"]
        if dtype == "float32":
            assert_close(got, oracle["logits_ema"], what=name)
        else:  # rounded weights (tests/integration/test_layouts.py measures by how much)
            assert max_abs(got, oracle["logits_ema"]) <= 25 * UNIT_ROUNDOFF[dtype] * np.abs(got).max(), name


def _calls(code: str) -> set[str]:
    """Every call in `code`, as its syntax tree: the same call however it is laid out."""
    return {ast.dump(node) for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Call)}


def _call(line: str) -> str:
    """The one call a card's line is, as its syntax tree."""
    return ast.dump(ast.parse(line).body[0].value)


def test_readme_timm_line_is_the_cards(readme_run):
    """The README's timm and mmpretrain examples are the very lines the cards of their files give."""
    in_readme = set().union(*(_calls(m["code"]) for m in MARKED.finditer(README.read_text()) if m["lang"] == "python"))
    card = json.loads((readme_run[0] / "b0-timm.json").read_text())
    assert _call(card["timm"]["create"]) in in_readme
    mm = json.loads((readme_run[0] / "b0-mm.json").read_text())
    assert _call(mm["mmpretrain"]["create"]) in in_readme
