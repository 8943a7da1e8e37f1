"""Keras 3 models made by Keras itself for the tests: keras.applications EfficientNets with random weights in a sane
range, nested in users' models, saved in every Keras 3 container; the logits Keras computes for them; and their
conversion (`convert_without_tensorflow`) and comparison (`assert_reproduces_keras`).

Imports Keras 3 (`import keras`), so only tests that need Keras import it.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import h5py
import keras
import numpy as np
import pytest
import torch

from effconv.formats.keras import KERAS_IMAGENET_MEAN, KERAS_IMAGENET_STD
from effconv.models import load
from tests.conftest import PROJECT_ROOT
from tests.support.helpers import assert_close, nchw

# Converts each (source, output) pair given as JSON by the CLI, in a process where TensorFlow and Keras cannot be
# imported (conversion must not need them).
BLOCKED = """
import json, sys
class NoTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "keras", "tf_keras", "tensorboard"):
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, NoTensorFlow())
from effconv.cli import main
for src, out in json.loads(sys.argv[1]):
    try:
        main(["convert", "--src", src, "--out", out, "-q"])
    except SystemExit as e:
        assert e.code in (0, None), (src, e.code)
assert not [m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "tf_keras")]
print("converted without tensorflow")
"""


@dataclass
class Case:
    """A source, its converted file, and Keras' outputs to match: (raw NHWC pixels, output) pairs."""

    src: Path
    out: Path
    checks: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    output: str = "logits"  # or "pooled" (a feature extractor's pooled features), "features" (the feature map)

    def card(self) -> dict:
        return json.loads(self.out.with_suffix(".json").read_text())


def convert_without_tensorflow(cases: Iterable[Case]) -> None:
    """Convert every case's source to its `out` by the CLI, in one process that cannot import TensorFlow or Keras."""
    pairs = [(str(c.src), str(c.out)) for c in cases]
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKED, json.dumps(pairs)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "converted without tensorflow" in proc.stdout


def _run(model, x_nhwc: np.ndarray, output: str) -> np.ndarray:
    pre = model.card["preprocessing"]
    x = (x_nhwc - np.array(pre["mean"], np.float32)) / np.array(pre["std"], np.float32)
    with torch.no_grad():
        if output == "features":
            return model.forward_features(nchw(x)).numpy().transpose(0, 2, 3, 1)
        return model(nchw(x)).numpy()


def assert_reproduces_keras(case: Case, name: str) -> None:
    """The converted model, fed each check's raw pixels normalised as its card says, gives Keras' own outputs."""
    model = load(case.out)
    for x, expected in case.checks:
        got = _run(model, x, case.output)
        diff, _ = assert_close(got, expected, what=f"{name} at {x.shape[1]} px")
        print(f"{name} at {x.shape[1]} px: max |diff| {diff:.3g} (outputs up to {np.abs(expected).max():.3g})")


def all_layers(model) -> list:
    """Every layer of `model`, nested models' layers included (in order)."""
    out = []
    for layer in model.layers:
        out.append(layer)
        if hasattr(layer, "layers"):
            out += all_layers(layer)
    return out


def randomise(model, rng: np.random.Generator, normalization=None, branch_gamma=(0.5, 1.5)) -> None:
    """Keras' own kernel initialisation, plus random biases and batch-norm statistics in a sane range.

    `normalization`: the (mean, variance) the Normalization layer stores (default: Keras' ImageNet values).
    `branch_gamma`: the range of the blocks' last batch-norm scales (`*project_bn`). A deep network (EfficientNetV2-S:
    40 blocks) needs them small, as trained ones are: otherwise each residual block adds a branch as large as its
    input, activations grow a thousandfold and the squeeze-excite gates turn float32 rounding into chaos.
    """
    mean, variance = normalization or (KERAS_IMAGENET_MEAN, KERAS_IMAGENET_STD)
    for layer in all_layers(model):
        kind = type(layer).__name__
        if kind == "BatchNormalization":
            n = layer.get_weights()[0].shape[0]
            gamma = rng.uniform(*(branch_gamma if layer.name.endswith("project_bn") else (0.5, 1.5)), n)
            layer.set_weights([gamma, rng.normal(0, 0.2, n), rng.normal(0, 0.2, n), rng.uniform(0.5, 1.5, n)])
        elif kind == "Normalization" and layer.get_weights():  # EfficientNetV2's holds constants, no weights
            layer.set_weights([np.array(mean), np.array(variance), layer.get_weights()[2]])
            layer.finalize_state()  # the mean/variance the layer computes with (set_weights leaves them stale)
        elif kind in ("Conv2D", "Dense") and layer.use_bias:
            kernel, bias = layer.get_weights()
            scale = 3.0 if kind == "Dense" else 1.0  # logits of a few units
            layer.set_weights([kernel * scale, rng.normal(0, 0.2, bias.shape)])


@contextlib.contextmanager
def imagenet_graph():
    """keras.applications builds its weights='imagenet' graph (with the compensating Rescaling), loading nothing.

    Offline: the download is replaced by a name and the load by nothing; the weights are then randomised.
    """
    from keras.src.applications import efficientnet
    from keras.src.models.functional import Functional

    with (
        mock.patch.object(efficientnet.file_utils, "get_file", return_value="unused.h5"),
        mock.patch.object(Functional, "load_weights", return_value=None),
    ):
        yield


def reference(model, x: np.ndarray) -> np.ndarray:
    """What Keras computes: the model's output, its final softmax (if any) made linear (logits)."""
    last = all_layers(model)[-1]
    activation = getattr(last, "activation", None)
    if type(last).__name__ == "Dense":
        last.activation = keras.activations.get("linear")
    try:
        return np.asarray(model(x, training=False))
    finally:
        if activation is not None:
            last.activation = activation


def without_names(src: Path, dst: Path) -> None:
    """A copy of a weights file without the layer names Keras 3.6 and later write (as an older Keras wrote it)."""
    shutil.copy(src, dst)
    dst.chmod(0o644)
    with h5py.File(dst, "r+") as f:
        groups = [f]
        f.visititems(lambda _n, obj: groups.append(obj) if isinstance(obj, h5py.Group) else None)
        for group in groups:
            if "name" in group.attrs:
                del group.attrs["name"]


FIXTURE = PROJECT_ROOT.parent / "shared" / "fixtures" / "keras3-b0"  # Keras 3's own files and logits


def fixture_oracle() -> dict[str, np.ndarray]:
    """The keras3-b0 fixture's oracle.npz (inputs and Keras's logits); a missing fixture fails, never skips."""
    if not (FIXTURE / "model.keras").is_file():
        pytest.fail(f"ground-truth fixture missing: {FIXTURE} (../shared must sit beside the project)")
    with np.load(FIXTURE / "oracle.npz") as data:
        return {k: data[k] for k in data.files}
