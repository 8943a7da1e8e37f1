"""Issue 13: `effconv verify` of Keras 3 sources runs Keras 3 itself as the reference, layer by layer.

Sources: the fixture `../shared/fixtures/keras3-b0` (EfficientNetB0 built for 224 px, `.keras` and `.weights.h5`) at
224 and 225 px (at 225 keras.applications' graph is rebuilt for the size), the fixture's two SavedModels made here by
Keras (`model.export`, `tf.saved_model.save`), and models Keras makes here at 64 px: a fine-tuned user model (the
backbone nested in a Sequential, Dropout + Dense(5) with softmax) and an EfficientNetV2B0. The reference itself must
give the fixture's ground-truth logits (and not those of the saved graph's fixed padding at 225); verify must fail
on a conversion whose weights were perturbed, at the block perturbed, and on a SavedModel whose graph holds a step
that keras.applications' graph does not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types

import keras  # Keras 3: a missing Keras fails here, these tests must never be skipped
import numpy as np
import pytest
import tensorflow as tf
import torch

from effconv.errors import ParityError, UsageError
from effconv.formats import open_source
from effconv.formats.keras3_reference import keras3
from effconv.models import spec
from effconv.parity.verify import endpoint_order, verify
from tests.conftest import PROJECT_ROOT
from tests.support.helpers import assert_close, run_cli
from tests.support.keras3_models import FIXTURE, fixture_oracle, imagenet_graph, randomise

# The fixture's graph folds to these (0-255 scale; test_keras3.py checks the card says so): Rescaling(1/255), then
# Normalization by Keras' stored ImageNet values, whose std is stored as the variance.
FIXTURE_MEAN = np.array([123.675, 116.28, 103.53])
FIXTURE_STD = np.sqrt([0.229, 0.224, 0.225]) * 255
SEED = 1313
SIZE = 64
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def oracle() -> dict[str, np.ndarray]:
    return fixture_oracle()


@pytest.fixture(scope="module")
def made(tmp_path_factory, oracle) -> dict:
    """Every source of these tests: the fixture's files and SavedModels, and the models Keras makes here."""
    tmp = tmp_path_factory.mktemp("keras3_verify")
    rng = np.random.default_rng(SEED)
    keras.utils.set_random_seed(SEED)
    apps, layers = keras.applications, keras.layers
    fixture = keras.models.load_model(FIXTURE / "model.keras")
    fixture.export(tmp / "fixture_export", verbose=False)
    tf.saved_model.save(fixture, str(tmp / "fixture_saved_model"))
    sources = {
        "fixture.keras": FIXTURE / "model.keras",
        "fixture.weights.h5": FIXTURE / "model.weights.h5",
        "fixture_export": tmp / "fixture_export",
        "fixture_saved_model": tmp / "fixture_saved_model",
    }

    # the commonest real file: an ImageNet-graph backbone fine-tuned with the user's Dropout + Dense head
    with imagenet_graph():
        base = apps.EfficientNetB0(include_top=False, pooling="avg", input_shape=(SIZE, SIZE, 3))
    tuned = keras.Sequential(
        [keras.Input((SIZE, SIZE, 3)), base, layers.Dropout(0.3), layers.Dense(5, activation="softmax")]
    )
    randomise(tuned, rng)
    tuned.save(tmp / "tuned.keras")
    tuned.save_weights(tmp / "tuned.weights.h5")
    sources |= {"tuned.keras": tmp / "tuned.keras", "tuned.weights.h5": tmp / "tuned.weights.h5"}

    v2 = apps.EfficientNetV2B0(weights=None, classes=7, input_shape=(SIZE, SIZE, 3))
    randomise(v2, rng, branch_gamma=(0.1, 0.3))  # sane activations through V2's blocks (see randomise)
    v2.save(tmp / "v2.keras")
    sources["v2.keras"] = tmp / "v2.keras"

    # a user's step before the backbone that no weight shows: a SavedModel holds it in its traced graph only
    inputs = keras.Input((SIZE, SIZE, 3))
    backbone = apps.EfficientNetB0(weights=None, include_top=False, pooling="avg", input_shape=(SIZE, SIZE, 3))
    inverted = layers.Rescaling(-1.0, offset=255.0)(inputs)  # 255 - x
    hidden = keras.Model(inputs, layers.Dense(3)(backbone(inverted)))
    randomise(hidden, rng)
    tf.saved_model.save(hidden, str(tmp / "hidden_step_saved_model"))
    sources["hidden_step_saved_model"] = tmp / "hidden_step_saved_model"
    return {"tmp": tmp, **sources}


def _report(name: str, report) -> None:
    for case in report.cases:
        worst = max(case.layers, key=lambda layer: layer.max_abs / layer.tolerance)
        print(
            f"{name} {case.name}: {case.logits.name} max |diff| {case.logits.max_abs:.3g} (limit "
            f"{case.logits.tolerance:.3g}, max {case.logits.ref_absmax:.3g}); worst layer {worst.name} "
            f"{worst.max_abs:.3g} (limit {worst.tolerance:.3g}); Keras {case.seconds_tf:.1f} s"
        )
    for note in report.notes[1:]:
        print(f"  {note}")


def _verify(name: str, src, sizes: list[int]):
    start = time.perf_counter()
    report = verify(src, input_sizes=sizes, batch=2, per_layer=True)
    print(f"{name}: verify at {sizes} took {time.perf_counter() - start:.1f} s")
    _report(name, report)
    assert report.passed, [(c.name, c.first_divergent) for c in report.cases]
    assert [c.input_size for c in report.cases] == [[s, s] for s in sizes]
    for case in report.cases:  # per layer, every endpoint lines up: stem, each block, head, pooling, logits
        assert [layer.name for layer in case.layers] == endpoint_order(len(spec.blocks(report.arch)), True)
    return report


def _notes(report, size: int) -> str:
    return next(n for n in report.notes if n.startswith(f"Keras 3 reference at {size}x{size}:"))


@pytest.mark.parametrize("name", ["fixture.keras", "fixture.weights.h5", "fixture_export", "fixture_saved_model"])
def test_reference_gives_the_fixtures_keras_logits(made, oracle, name):
    """The reference alone, fed the fixture's pixels normalised as its card says, gives Keras' logits: at 224 the
    saved model's, at 225 those of keras.applications built for 225 (not the saved graph's fixed padding)."""
    with open_source(made[name]) as source:
        reference, detected, _ = source.format.tf_reference(source, "b0", "auto", False, lambda _m: None)
    assert detected.arch == "b0" and detected.num_classes == 10
    for size in (224, 225):
        x = ((oracle[f"x_{size}"] - FIXTURE_MEAN) / FIXTURE_STD).astype(np.float32)
        out = reference(x, endpoints=True)
        assert set(endpoint_order(16, True)) <= set(out), sorted(out)
        diff, limit = assert_close(out["logits"], oracle[f"y_{size}"], what=f"{name} at {size}")
        print(f"{name} reference at {size} px: logits max |diff| {diff:.3g} from Keras' (limit {limit:.3g})")
    assert np.abs(out["logits"] - oracle["y_225_filegraph"]).max() > 1.0  # the saved graph's padding at 225


def test_verify_fixture_archive_at_built_and_other_size(made):
    report = _verify("fixture.keras", made["fixture.keras"], [224, 225])
    assert "the loaded model's own layers" in _notes(report, 224) and "loaded model itself gives" in _notes(report, 224)
    assert "EfficientNetB0 rebuilt for 225x225" in _notes(report, 225)
    assert report.weights == "as stored" and report.notes[0].startswith("reference: Keras 3.")


def test_verify_cli_fixture_weights_file_gets_keras3_under_legacy_keras_setting(made, tmp_path):
    """The CLI once, in a process where TF_USE_LEGACY_KERAS=1 makes tf.keras the legacy Keras: the reference is
    Keras 3 all the same."""
    report_path = tmp_path / "verify.json"
    args = ["verify", "--src", str(made["fixture.weights.h5"]), "--input-size", "224", "--input-size", "225"]
    args += ["--batch", "1", "--per-layer", "--report", str(report_path)]
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2")
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from effconv.cli import main; main(sys.argv[1:])", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=PROJECT_ROOT,
    )
    print(f"CLI verify of fixture.weights.h5 at 224 and 225 took {time.perf_counter() - start:.1f} s")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("PASS: efficientnet-b0, 2 case(s)")
    report = json.loads(report_path.read_text())
    for case in report["cases"]:
        logits = case["logits"]
        print(f"CLI {case['name']}: logits max |diff| {logits['max_abs']:.3g} (limit {logits['tolerance']:.3g})")
        assert [layer["name"] for layer in case["layers"]] == endpoint_order(16, True)
    notes = " ".join(report["notes"])
    assert "load_weights" in notes and "built for 225x225" in notes and "Keras 3." in notes


def test_verify_saved_models_checked_against_their_serving_signature(made):
    for name, sizes in (("fixture_export", [224, 225]), ("fixture_saved_model", [224])):
        report = _verify(name, made[name], sizes)
        assert "serving signature itself gives the reference's logits (log softmax)" in _notes(report, 224)
        if 225 in sizes:
            assert "takes 224x224 only: not run at this size" in _notes(report, 225)


def test_verify_fine_tuned_user_model(made):
    report = _verify("tuned.keras", made["tuned.keras"], [SIZE, SIZE + 1])
    assert "loaded model itself gives the reference's logits" in _notes(report, SIZE)
    assert "rebuilt for 65x65" in _notes(report, SIZE + 1)
    report = _verify("tuned.weights.h5", made["tuned.weights.h5"], [SIZE])
    assert "Sequential([EfficientNetB0(include_top=False, pooling='avg'), 1 Dropout, Dense(5)])" in _notes(report, SIZE)


def test_verify_efficientnet_v2(made):
    report = _verify("v2.keras", made["v2.keras"], [SIZE, SIZE + 1])
    assert report.arch == "v2-b0" and "EfficientNetV2B0 rebuilt for 65x65" in _notes(report, SIZE + 1)


def test_verify_fails_on_a_perturbed_conversion_at_the_block_perturbed(made, tmp_path):
    converted = tmp_path / "b0.pth"
    assert run_cli("convert", "--src", made["fixture.keras"], "--out", converted, "-q").exit_code == 0
    state = torch.load(converted, weights_only=True)
    (key,) = [k for k in state if k.startswith("blocks.3.") and "project" in k and state[k].ndim == 4]
    state[key] = state[key] * 1.05
    torch.save(state, converted)
    report_path = tmp_path / "verify.json"
    args = ["--weights", converted, "--batch", "1", "--report", report_path]
    result = run_cli("verify", "--src", made["fixture.keras"], *args)
    assert result.exit_code == 1 and "FAIL: b0@224 first diverges at block_3" in result.output, result.output
    case = json.loads(report_path.read_text())["cases"][0]
    passed = {layer["name"]: layer["passed"] for layer in case["layers"]}
    assert all(passed[layer] for layer in ("stem", "block_0", "block_1", "block_2")) and not passed["block_3"]
    block = next(layer for layer in case["layers"] if layer["name"] == "block_3")
    print(f"perturbed {key}: block_3 max |diff| {block['max_abs']:.3g} (limit {block['tolerance']:.3g})")


def test_saved_model_computing_something_else_fails(made):
    """A SavedModel whose traced graph inverts the pixels before the backbone (no weight shows it): the converted
    model follows keras.applications' graph, the SavedModel itself does not, and verify says so (exit 1)."""
    with pytest.raises(ParityError, match="serving signature computes something other") as caught:
        verify(made["hidden_step_saved_model"], input_sizes=[SIZE], batch=1)
    assert caught.value.exit_code == 1
    print(caught.value)


def test_a_keras_that_is_not_keras3_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "keras", types.SimpleNamespace(__version__="2.15.0"))
    with pytest.raises(UsageError, match="runs Keras 3 itself, but `import keras` gives Keras 2.15.0"):
        keras3()
