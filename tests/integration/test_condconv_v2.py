"""CondConv and EfficientNetV2 checkpoints whose names differ from the fixtures', and verify on every new family's
fixture (passing, and naming the block of a broken conversion).

The renamed checkpoints are written by TensorFlow itself (`SaveV2`, what the official Saver calls) from the
fixtures' own tensors: CondConv kernels numbered and scoped otherwise (as TF 1.x may have named them), an
unofficial network scope, and EfficientNetV2's classifier under `head_1/dense` (what the current automl code
writes in TF1 graph mode).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from effconv.convert import convert_checkpoint
from effconv.errors import MappingError
from effconv.models import create_model
from tests.conftest import PROJECT_ROOT
from tests.support.helpers import assert_close, nchw, run_cli

FIXTURES = PROJECT_ROOT.parent / "shared" / "fixtures"


def _fixture(name: str) -> Path:
    path = FIXTURES / name
    if not (path / "ckpt" / "checkpoint").is_file():
        pytest.fail(f"ground-truth fixture missing: {path} (../shared must sit beside the project)")
    return path


def _oracle(path: Path) -> dict[str, np.ndarray]:
    with np.load(path / "oracle.npz") as data:
        return {k: data[k] for k in data.files}


def _renamed(src: Path, dest: Path, rename) -> Path:
    """A copy of checkpoint `src` written by TensorFlow with every variable renamed by `rename` (None: dropped)."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(src))
    names, tensors = [], []
    for name in sorted(reader.get_variable_to_shape_map()):
        new = rename(name)
        if new is not None:
            names.append(new)
            tensors.append(tf.constant(reader.get_tensor(name)))
    dest.mkdir(parents=True)
    tf.raw_ops.SaveV2(
        prefix=str(dest / "model.ckpt"), tensor_names=names, shape_and_slices=[""] * len(names), tensors=tensors
    )
    return dest / "model.ckpt"


def _logits(result, x: np.ndarray) -> np.ndarray:
    model = create_model(result.detected.arch, result.detected.num_classes)
    model.load_state_dict(result.state_dict, strict=True)
    with torch.no_grad():
        return model(nchw(x)).numpy()


def _tf1_condconv_names(name: str) -> str:
    """No `model/` scope, another network scope, and CondConv layers numbered from 100 with other gaps."""
    name = name.replace("efficientnet-condconv-b0-4e/", "my-condconv/")
    name = name.replace("/model/blocks_", "/blocks_")
    return re.sub(r"cond_conv2d(?:_(\d+))?/", lambda m: f"cond_conv2d_{100 + 5 * int(m.group(1) or 0)}/", name)


def test_condconv_kernels_found_by_block_and_order(tmp_path):
    path = _fixture("official-condconv-b0-4e")
    ckpt = _renamed(path / "ckpt", tmp_path / "ckpt", _tf1_condconv_names)
    result = convert_checkpoint(ckpt, variant="standard")
    # detected from names and shapes alone: 16 blocks, stem 32, head 1280 also fit b0, lite0 and condconv-b0-8e
    assert (result.detected.arch, result.detected.family) == ("condconv-b0-4e", "condconv")
    assert result.skipped == {"global_step": "training counter"}
    oracle = _oracle(path)
    assert_close(_logits(result, oracle["x"]), oracle["logits_ema"], what="renamed condconv")


def test_condconv_block_missing_a_kernel_is_named(tmp_path):
    path = _fixture("official-condconv-b0-4e")
    ckpt = _renamed(path / "ckpt", tmp_path / "ckpt", lambda n: None if "blocks_9/cond_conv2d_5/" in n else n)
    with pytest.raises(MappingError, match=r"cond_conv2d layers under .*blocks_9: rows name 2 .*1 found"):
        convert_checkpoint(ckpt, arch="condconv-b0-4e", variant="standard")


def test_condconv_experts_tell_4e_from_8e(tmp_path):
    """A 4-expert checkpoint under another scope is condconv-b0-4e: the 8-expert size has the same names."""
    path = _fixture("official-condconv-b0-4e")
    ckpt = _renamed(path / "ckpt", tmp_path / "ckpt", lambda n: n.replace("efficientnet-condconv-b0-4e/", "net/"))
    assert convert_checkpoint(ckpt, variant="standard").detected.arch == "condconv-b0-4e"
    result = run_cli("convert", "--src", ckpt, "--arch", "condconv-b0-8e", "--out", tmp_path / "x.pth")
    assert result.exit_code == 2 and "the checkpoint holds condconv-b0-4e" in result.output


def test_v2_classifier_under_head_1(tmp_path):
    path = _fixture("official-v2-b0")
    ckpt = _renamed(path / "ckpt", tmp_path / "ckpt", lambda n: n.replace("/head/dense/", "/head_1/dense/"))
    result = convert_checkpoint(ckpt, variant="standard")
    assert (result.detected.arch, result.detected.num_classes) == ("v2-b0", 10)
    assert result.skipped == {"global_step": "training counter"}
    oracle = _oracle(path)
    assert_close(_logits(result, oracle["x_odd"]), oracle["logits_ema_odd"], what="head_1 classifier")


def _broken(artifact: Path, tmp_path: Path, key: str) -> Path:
    state = torch.load(artifact, weights_only=True)
    state[key] = state[key].flip(0).contiguous()
    tmp_path.mkdir()
    out = tmp_path / "broken.pth"
    torch.save(state, out)
    out.with_suffix(".json").write_text(artifact.with_suffix(".json").read_text())
    return out


@pytest.mark.parametrize(
    ("fixture", "broken"),
    [
        # expert kernels flipped by expert; the routing layer
        ("official-condconv-b0-4e", {"blocks.9.dw_conv.weight": "block_9", "blocks.11.routing.weight": "block_11"}),
        # fused without expansion; fused with expansion
        ("official-v2-b0", {"blocks.0.project_conv.weight": "block_0", "blocks.3.expand_conv.weight": "block_3"}),
        # the other new families: a Lite MBConv without squeeze-excite; an EdgeTPU edge-residual block
        ("official-lite0", {"blocks.4.dw_conv.weight": "block_4"}),
        ("official-edgetpu-s", {"blocks.2.expand_conv.weight": "block_2"}),
    ],
)
def test_verify_passes_and_names_a_broken_block(fixture, broken, tmp_path):
    # on the fixture's own input: its random weights (BN channels of tiny variance) blow N(0,1) noise up to 1e5
    ckpt, inputs = _fixture(fixture) / "ckpt", _fixture(fixture) / "oracle.npz"
    artifact = tmp_path / "m.pth"
    assert run_cli("convert", "--src", ckpt, "--out", artifact, "-q").exit_code == 0
    good = run_cli("verify", "--src", ckpt, "--weights", artifact, "--inputs", inputs)
    assert good.exit_code == 0 and good.stdout.splitlines()[-1].startswith("PASS"), good.output
    for key, block in broken.items():
        bad = run_cli("verify", "--src", ckpt, "--weights", _broken(artifact, tmp_path / key, key), "--inputs", inputs)
        assert bad.exit_code == 1 and f"first diverges at {block}" in bad.stdout, bad.output
