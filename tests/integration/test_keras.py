"""Issue 4: Keras applications EfficientNet .h5 files convert to models that reproduce Keras.

Keras builds the real EfficientNetB0/B2 (weights=None), the weights are randomised
with sane batch-norm statistics, the model is saved as legacy HDF5, converted, and
the converted model, fed the same raw 0-255 pixels normalised as its card says,
must give Keras' own logits.
"""

from __future__ import annotations

import json

import h5py
import keras  # a missing Keras fails here: these tests must never be skipped
import numpy as np
import pytest
import torch

from effconv.convert import convert_checkpoint
from effconv.formats.keras import KERAS_IMAGENET_MEAN, KERAS_IMAGENET_STD
from effconv.models import load
from effconv.variants import IMAGENET_MEAN, IMAGENET_STD
from tests.support.helpers import assert_close, nchw, run_cli

SEED = 4
# Keras' TF backend calls np.array(x, copy=False) on every weight it saves: noise, not a finding.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _randomise(model, rng: np.random.Generator, normalization: tuple[list[float], list[float]]) -> None:
    """Keras' own kernel initialisation, plus random biases and batch-norm statistics in a sane range."""
    for layer in model.layers:
        kind = type(layer).__name__
        if kind == "BatchNormalization":
            n = layer.get_weights()[0].shape[0]
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, n),
                    rng.normal(0, 0.2, n),
                    rng.normal(0, 0.2, n),
                    rng.uniform(0.5, 1.5, n),
                ]
            )
        elif kind == "Normalization":
            mean, variance = normalization
            layer.set_weights([np.array(mean), np.array(variance), layer.get_weights()[2]])
        elif kind in ("Conv2D", "Dense") and layer.use_bias:
            kernel, bias = layer.get_weights()
            layer.set_weights([kernel, rng.normal(0, 0.2, bias.shape)])


@pytest.fixture(scope="module")
def keras_cases(tmp_path_factory):
    """(name, .h5 path, raw pixels, Keras output) for B0 and B2, with and without top."""
    tmp = tmp_path_factory.mktemp("keras")
    rng = np.random.default_rng(SEED)
    cases = {}
    builds = {
        # B0: an arbitrary input normalisation; B2: the std-as-variance values of Keras' own ImageNet files.
        "b0": (keras.applications.EfficientNetB0, 224, ([0.45, 0.5, 0.4], [0.06, 0.05, 0.07])),
        "b2": (keras.applications.EfficientNetB2, 260, (list(KERAS_IMAGENET_MEAN), list(KERAS_IMAGENET_STD))),
    }
    for arch, (build, size, normalization) in builds.items():
        pixels = rng.integers(0, 256, (2, size, size, 3)).astype(np.float32)
        for top in (True, False):
            keras.utils.set_random_seed(SEED)
            # A fixed input shape, as include_top=True implies: with input_shape=None Keras pads every
            # stride-2 conv as if its input were even, which is not TF 'SAME' where a map is odd (B2: 65 px).
            model = build(
                weights=None,
                include_top=top,
                input_shape=(size, size, 3),
                pooling=None if top else "avg",
                classifier_activation=None,
            )
            _randomise(model, rng, normalization)
            name = f"{arch}{'' if top else '_notop'}"
            path = tmp / f"efficientnet{name}.h5"
            model.save(path)  # Keras 3 writes a legacy HDF5 model for .h5
            # The reference is the model Keras loads from the file (set_weights leaves Normalization's
            # derived mean/variance stale in Keras 3; loading refreshes them).
            reloaded = keras.models.load_model(path, compile=False)
            cases[name] = (path, pixels, np.asarray(reloaded(pixels, training=False)))
    return cases


@pytest.mark.parametrize("name", ["b0", "b0_notop", "b2", "b2_notop"])
def test_converted_model_reproduces_keras(keras_cases, tmp_path, name):
    path, pixels, expected = keras_cases[name]
    out = tmp_path / f"{name}.pth"
    result = run_cli("convert", "--src", path, "--out", out)
    assert result.exit_code == 0, result.output
    assert "3 input normalisation" in result.output
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["source"]["format"] == "keras-h5" and card["weights"] == "as stored"
    assert card["num_classes"] == (1000 if "notop" not in name else 0)
    pre = card["preprocessing"]
    x = (pixels - np.array(pre["mean"], np.float32)) / np.array(pre["std"], np.float32)
    model = load(out)
    with torch.no_grad():
        got = model(nchw(x.astype(np.float32))).numpy()
    assert got.shape == expected.shape
    diff, limit = assert_close(got, expected, what=name)
    print(f"Keras {name}: max |diff| = {diff:.3g} (outputs up to {np.abs(expected).max():.3g}, limit {limit:.3g})")


def test_card_states_the_keras_graphs_normalisation(keras_cases, tmp_path):
    b0 = convert_checkpoint(keras_cases["b0"][0]).card
    steps = b0["input_normalization"]["steps"]
    assert (
        "Rescaling" in steps[0] and "Normalization" in steps[1] and "model_config" in b0["input_normalization"]["graph"]
    )
    np.testing.assert_allclose(b0["preprocessing"]["mean"], [114.75, 127.5, 102.0], rtol=1e-6)
    np.testing.assert_allclose(b0["preprocessing"]["std"], 255 * np.sqrt([0.06, 0.05, 0.07]), rtol=1e-6)
    # This B2 graph has no compensating Rescaling, so it divides by sqrt(std): the card says exactly that.
    b2 = convert_checkpoint(keras_cases["b2"][0]).card
    np.testing.assert_allclose(b2["preprocessing"]["std"], 255 * np.sqrt(KERAS_IMAGENET_STD), rtol=1e-6)


def _as_keras2_weights_file(src, dst, normalization=None) -> None:
    """Rewrite a Keras 3 legacy model file in the layout of Keras 2 `save_weights` and Keras applications' files.

    That layout (checked against a real tf-keras 2.21 file): `layer_names` at the root, one group per
    layer with `weight_names` such as `stem_conv/kernel:0`, the depthwise kernel as `depthwise_kernel`.
    """
    with h5py.File(src, "r") as f, h5py.File(dst, "w") as g:
        root = f["model_weights"]
        g.attrs["layer_names"] = root.attrs["layer_names"]
        g.attrs["backend"], g.attrs["keras_version"] = "tensorflow", "2.21.0"
        for layer in root.attrs["layer_names"]:
            group = g.create_group(layer)
            names = []
            for weight in root[layer].attrs["weight_names"]:
                renamed = weight.replace("dwconv/kernel", "dwconv/depthwise_kernel") + ":0"
                data = root[layer][weight][()]
                if normalization and layer.startswith("normalization") and not weight.endswith("count"):
                    data = np.array(normalization[0 if weight.endswith("mean") else 1], np.float32)
                group.create_dataset(renamed, data=data)
                names.append(renamed.encode())
            group.attrs["weight_names"] = np.array(names, dtype=object if names else "S1")


def test_keras2_weights_file_gives_the_same_tensors(keras_cases, tmp_path):
    model_file = keras_cases["b0"][0]
    weights_file = tmp_path / "efficientnetb0.h5"
    _as_keras2_weights_file(model_file, weights_file)
    a, b = convert_checkpoint(model_file), convert_checkpoint(weights_file)
    assert b.card["source"]["saved_as"] == "weights" and a.card["source"]["saved_as"] == "model"
    assert a.state_dict.keys() == b.state_dict.keys()
    assert all(torch.equal(v, b.state_dict[k]) for k, v in a.state_dict.items())
    # Without a saved graph, the keras.applications graph is assumed: the same steps here.
    np.testing.assert_allclose(a.card["preprocessing"]["std"], b.card["preprocessing"]["std"], rtol=1e-7)


def test_keras_imagenet_quirk_folds_to_imagenet_mean_std(keras_cases, tmp_path):
    """Keras' own ImageNet files store std as variance; Keras(weights='imagenet') compensates."""
    weights_file = tmp_path / "efficientnetb0_notop.h5"
    _as_keras2_weights_file(keras_cases["b0_notop"][0], weights_file, (KERAS_IMAGENET_MEAN, KERAS_IMAGENET_STD))
    card = convert_checkpoint(weights_file).card
    np.testing.assert_allclose(card["preprocessing"]["mean"], IMAGENET_MEAN, rtol=1e-6)
    np.testing.assert_allclose(card["preprocessing"]["std"], IMAGENET_STD, rtol=1e-6)
    assert card["variant"] == "standard" and "tensorflow#49930" in card["input_normalization"]["note"]
    assert card["num_classes"] == 0


def test_keras_source_to_timm_layout_and_half(keras_cases):
    result = convert_checkpoint(keras_cases["b2"][0], layout="timm", dtype="float16")
    assert "conv_stem.weight" in result.state_dict and result.state_dict["conv_stem.weight"].dtype == torch.float16
    assert result.card["timm"]["pretrained_cfg"]["input_size"] == [3, 260, 260]


def test_unsupported_keras_files_fail_clearly(keras_cases, tmp_path):
    # Keras 3 .keras and .weights.h5 files are read since issue 13 (tests/integration/test_keras3.py)
    (tmp_path / "b0.keras").write_bytes(b"PK")
    result = run_cli("convert", "--src", tmp_path / "b0.keras", "--out", tmp_path / "x.pth")
    assert result.exit_code == 2 and ".keras archive" in result.stderr
    (tmp_path / "other.h5").write_bytes(b"not hdf5")
    result = run_cli("convert", "--src", tmp_path / "other.h5", "--out", tmp_path / "x.pth")
    assert result.exit_code == 2 and "not a readable HDF5 file" in result.stderr
    result = run_cli("convert", "--src", keras_cases["b0"][0], "--out", tmp_path / "x.pth", "--ema", "ema")
    assert result.exit_code == 2 and "one copy" in result.stderr
    result = run_cli("convert", "--src", keras_cases["b0"][0], "--out", tmp_path / "x.pth", "--arch", "b3")
    assert result.exit_code == 2 and "holds b0" in result.stderr


def test_inspect_understands_h5(keras_cases):
    result = run_cli("inspect", "--src", keras_cases["b2_notop"][0])
    assert result.exit_code == 0, result.output
    assert "b2 (23 blocks)" in result.output and "no classifier head" in result.output and "Keras 3" in result.output
    report = json.loads(run_cli("inspect", "--src", keras_cases["b0"][0], "--json").output)
    assert report["format"] == "keras-h5" and report["model_variables"] == 311 and not report["missing"]
    assert report["unknown_variables"] == []


# Issue 11 §1: `verify --src X.h5` runs Keras itself (tf-keras) as the reference, layer by layer.


def _verify_report(tmp_path, *args) -> tuple[int, dict, str]:
    report = tmp_path / "verify.json"
    result = run_cli("verify", *args, "--batch", "1", "--per-layer", "--report", report)
    return result.exit_code, json.loads(report.read_text()) if report.is_file() else {}, result.output


@pytest.mark.parametrize("name", ["b0", "b0_notop", "b2_notop"])
def test_verify_runs_keras_itself_as_the_reference(keras_cases, tmp_path, name):
    path = keras_cases[name][0]
    code, report, output = _verify_report(tmp_path, "--src", path)
    assert code == 0, output
    case = report["cases"][0]
    names = [layer["name"] for layer in case["layers"]]
    blocks = 16 if name.startswith("b0") else 23
    assert names[:2] == ["stem", "block_0"] and f"block_{blocks - 1}" in names and "head_1x1" in names
    assert ("logits" in names) == ("notop" not in name) and case["first_divergent"] is None
    final = case["logits"]
    print(
        f"Keras {name} vs converted: {final['name']} max |diff| {final['max_abs']:.3g} (tol {final['tolerance']:.3g})"
    )


def test_verify_keras_source_against_a_converted_file_and_a_weights_only_file(keras_cases, tmp_path):
    model_file = keras_cases["b0"][0]
    converted = tmp_path / "b0.safetensors"
    assert run_cli("convert", "--src", model_file, "--out", converted, "-q").exit_code == 0
    code, report, output = _verify_report(tmp_path, "--src", model_file, "--weights", converted)
    assert code == 0 and report["artifact"] == str(converted), output
    weights_file = tmp_path / "efficientnetb0.h5"  # Keras 2 save_weights layout: no graph in the file
    _as_keras2_weights_file(model_file, weights_file)
    code, report, output = _verify_report(tmp_path, "--src", weights_file, "--weights", converted)
    assert code == 0, output


def test_verify_keras_source_finds_the_first_differing_block(keras_cases, tmp_path):
    """A converted file whose block 3 (block3a) differs from the .h5 fails at block_3, not before."""
    model_file = keras_cases["b0"][0]
    changed = tmp_path / "changed.h5"
    changed.write_bytes(model_file.read_bytes())
    with h5py.File(changed, "r+") as f:
        kernels = []
        f.visititems(lambda n, obj: kernels.append(n) if "block3a_project_conv" in n and n.endswith("kernel") else None)
        assert len(kernels) == 1, kernels
        f[kernels[0]][...] = f[kernels[0]][()] * 1.05
    converted = tmp_path / "changed.pth"
    assert run_cli("convert", "--src", changed, "--out", converted, "-q").exit_code == 0
    code, report, output = _verify_report(tmp_path, "--src", model_file, "--weights", converted)
    assert code == 1, output
    assert report["cases"][0]["first_divergent"] == "block_3"
