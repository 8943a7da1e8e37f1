"""Issue 13, Keras EfficientNetV2: keras.applications' EfficientNetV2B0..B3/S/M/L saved by Keras 3 convert to effconv's
EfficientNetV2 and reproduce Keras.

Every file is made here by Keras itself (random weights, small inputs): V2B0 and V2S with and without top as
`.keras` and `.weights.h5`, SavedModels (`model.export`) of V2S and of a fine-tuned V2B0 nested in a user's model
with Dropout + Dense(5), a V2B0 built with include_preprocessing=False. All are converted by the CLI in one process
where TensorFlow and Keras cannot be imported; the converted models, fed raw pixels normalised as their cards say,
must give Keras' own outputs. V2's input constants live in keras.applications' code (B0-B3: ImageNet mean/std,
S/M/L: (x - 128) / 128), not in any weight.
"""

from __future__ import annotations

import json
import re

import keras  # Keras 3: a missing Keras fails here, these tests must never be skipped
import numpy as np
import pytest
import torch

from effconv.convert import convert_checkpoint
from effconv.errors import UsageError
from effconv.models import spec
from effconv.variants import IMAGENET_MEAN, IMAGENET_STD
from tests.support.helpers import run_cli
from tests.support.keras3_models import (
    Case,
    assert_reproduces_keras,
    convert_without_tensorflow,
    randomise,
    reference,
    without_names,
)

SEED = 1302
SIZE = 64  # the input side of the models built for a size
ODD = 75  # a second side for the models built without one: odd maps, where TF 'SAME' pads unevenly
BRANCH_GAMMA = (0.1, 0.3)  # the blocks' last batch-norm scales: activations of a sane size in 40 blocks (randomise)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _pixels(rng, size: int = SIZE) -> np.ndarray:
    return rng.integers(0, 256, (2, size, size, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Case]:
    """Every source of these tests, converted (outputs beside them) in a process that cannot import TensorFlow."""
    tmp = tmp_path_factory.mktemp("keras3_v2")
    rng = np.random.default_rng(SEED)
    keras.utils.set_random_seed(SEED)
    apps, layers = keras.applications, keras.layers
    x, x_odd = _pixels(rng), _pixels(rng, ODD)
    cases: dict[str, Case] = {}

    def save(model, name: str, checks, output: str = "logits", export: bool = False) -> None:
        model.save(tmp / f"{name}.keras")
        model.save_weights(tmp / f"{name}.weights.h5")
        for suffix in (".keras", ".weights.h5"):
            cases[name + suffix] = Case(tmp / f"{name}{suffix}", tmp / f"{name}{suffix}.pth", checks, output)
        if export:
            model.export(tmp / f"{name}_export", verbose=False)
            cases[f"{name}_export"] = Case(tmp / f"{name}_export", tmp / f"{name}_export.pth", checks, output)

    b0 = apps.EfficientNetV2B0(weights=None, classes=7, input_shape=(SIZE, SIZE, 3))
    randomise(b0, rng, branch_gamma=BRANCH_GAMMA)
    save(b0, "b0", [(x, reference(b0, x))])
    # built without an input size: Keras pads 'same' at any size, checked at an even and an odd one
    b0f = apps.EfficientNetV2B0(weights=None, include_top=False)
    randomise(b0f, rng, branch_gamma=BRANCH_GAMMA)
    save(b0f, "b0_features", [(x, reference(b0f, x)), (x_odd, reference(b0f, x_odd))], "features")

    s = apps.EfficientNetV2S(weights=None, classes=5, input_shape=(SIZE, SIZE, 3), classifier_activation=None)
    randomise(s, rng, branch_gamma=BRANCH_GAMMA)
    save(s, "s", [(x, reference(s, x))], export=True)
    sp = apps.EfficientNetV2S(weights=None, include_top=False, pooling="avg")
    randomise(sp, rng, branch_gamma=BRANCH_GAMMA)
    save(sp, "s_pooled", [(x, reference(sp, x)), (x_odd, reference(sp, x_odd))], "pooled")

    # the commonest real file: a V2B0 backbone nested in the user's model, fine-tuned with Dropout + Dense(5)
    base = apps.EfficientNetV2B0(weights=None, include_top=False, pooling="avg", input_shape=(SIZE, SIZE, 3))
    tuned = keras.Sequential(
        [keras.Input((SIZE, SIZE, 3)), base, layers.Dropout(0.3), layers.Dense(5, activation="softmax")]
    )
    randomise(tuned, rng, branch_gamma=BRANCH_GAMMA)
    save(tuned, "tuned", [(x, reference(tuned, x))], export=True)

    # no input layers at all: the model takes its input as given
    raw = apps.EfficientNetV2B0(weights=None, include_top=False, pooling="avg", include_preprocessing=False)
    randomise(raw, rng, branch_gamma=BRANCH_GAMMA)
    x_unit = (x / 127.5 - 1).astype(np.float32)
    save(raw, "raw", [(x_unit, reference(raw, x_unit))], "pooled")

    convert_without_tensorflow(cases.values())
    return cases


CASES = [
    *(
        f"{name}{suffix}"
        for name in ("b0", "b0_features", "s", "s_pooled", "tuned", "raw")
        for suffix in (".keras", ".weights.h5")
    ),
    "s_export",
    "tuned_export",
]


@pytest.mark.parametrize("name", CASES)
def test_converted_v2_reproduces_keras(made, name):
    assert_reproduces_keras(made[name], name)


ARCHS = {"b0": "v2-b0", "b0_features": "v2-b0", "s": "v2-s", "s_pooled": "v2-s", "tuned": "v2-b0", "raw": "v2-b0"}


def test_cards_fold_keras_applications_own_input_constants(made):
    """B0-B3 normalise as V1 (ImageNet mean/std), S/M/L (x - 128) / 128; the weights hold neither."""
    for name, case in made.items():
        card = case.card()
        arch = ARCHS[name.split(".")[0].removesuffix("_export")]
        assert card["arch"] == arch and card["family"] == "v2", name
        pre = card["preprocessing"]
        if name.startswith("raw"):
            mean, std = [0.0] * 3, [1.0] * 3
        elif arch == "v2-s":
            mean, std = [128.0] * 3, [128.0] * 3
        else:
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        np.testing.assert_allclose(pre["mean"], mean, rtol=1e-6, atol=1e-9, err_msg=name)
        np.testing.assert_allclose(pre["std"], std, rtol=1e-6, err_msg=name)
        assert pre["interpolation"] == spec.preprocessing_of(arch).interpolation, name
        assert "padding='same'" in card["source"]["padding"], name
        norm = card["input_normalization"]
        if name.endswith(".keras"):
            assert norm["graph"].startswith("the graph saved in the archive") and "note" not in norm, name
        elif name.startswith("raw"):
            assert "include_preprocessing=False" in norm["note"] and norm["steps"] == [], name
        else:
            assert "include_preprocessing=True" in norm["note"], name
    b0 = made["b0.keras"].card()
    # layer names as Keras gave them: `rescaling`, or `rescaling_15` after other models in this process
    steps = [re.sub(r"_\d+$", "", s.split(" ", 1)[0]) for s in b0["input_normalization"]["steps"]]
    assert steps == ["rescaling", "normalization"]
    assert b0["variant"] == "standard" and b0["num_classes"] == 7 and not b0["skipped"]
    steps = made["s.keras"].card()["input_normalization"]["steps"]
    assert len(steps) == 1 and "(Rescaling)" in steps[0]


def test_saved_models_show_the_input_constants(made):
    tuned = made["tuned_export"].card()["source"]
    assert tuned["saved_as"].startswith("model.export") and set(tuned["input_constants"]) == {
        "rescaling's scale",
        "normalization's mean",
        "normalization's variance",
    }
    assert "not found" not in tuned["input_constants"].values() and tuned["output_activation"] == "softmax"
    s = made["s_export"].card()["source"]
    assert set(s["input_constants"]) == {"rescaling's scale"}
    assert "not found" not in s["input_constants"].values() and s["serving_graph"]["input_shape"] == [-1, 64, 64, 3]
    assert "rescaling_1_255" not in s["serving_graph"] and s["output_activation"] is None


def test_heads_and_nesting(made):
    tuned = made["tuned.keras"].card()
    assert tuned["num_classes"] == 5 and tuned["source"]["backbone"] == "efficientnetv2-b0"
    assert [(h["class"], h.get("rate")) for h in tuned["source"]["head"]] == [
        ("GlobalAveragePooling2D", None),
        ("Dropout", 0.3),
        ("Dense", None),
    ]
    assert made["s.keras"].card()["source"]["output"] == "logits of 5 classes"
    assert made["b0_features.weights.h5"].card()["num_classes"] == 0
    assert "feature map" in made["b0_features.weights.h5"].card()["source"]["output"]
    assert "pooled" in made["s_pooled.weights.h5"].card()["source"]["output"]


def test_v2_weights_files_without_layer_names_are_rebuilt(made, tmp_path):
    """Keras before 3.6 wrote no layer names: V2's layers are rebuilt by class and order, the arch from the class
    counts (EfficientNetB0 and EfficientNetV2B0 have as many depthwise convs and the same stem and head widths)."""
    for name in ("b0.weights.h5", "s_pooled.weights.h5", "tuned.weights.h5"):
        bare = tmp_path / name
        without_names(made[name].src, bare)
        named, rebuilt = convert_checkpoint(made[name].src), convert_checkpoint(bare)
        assert "rebuilt" in rebuilt.card["source"]["layers_from"] and rebuilt.card["arch"] == named.card["arch"]
        assert named.state_dict.keys() == rebuilt.state_dict.keys()
        assert all(torch.equal(v, rebuilt.state_dict[k]) for k, v in named.state_dict.items()), name
        assert named.card["preprocessing"] == rebuilt.card["preprocessing"], name
    with pytest.raises(UsageError, match="it holds v2-b0"):
        convert_checkpoint(tmp_path / "b0.weights.h5", arch="b0")


def test_inspect_describes_a_keras_v2_source(made):
    result = run_cli("inspect", "--src", made["s.keras"].src)
    assert result.exit_code == 0, result.output
    assert (
        "v2-s (40 blocks)" in result.output and "(x - [128.0, 128.0, 128.0]) / [128.0, 128.0, 128.0]" in result.output
    )
    report = json.loads(run_cli("inspect", "--src", made["tuned_export"].src, "--json").output)
    assert report["arch"] == "v2-b0" and report["unknown_variables"] == [] and not report["missing"]
    raw = run_cli("inspect", "--src", made["raw.weights.h5"].src).output
    assert "folded from no input layers" in raw and "include_preprocessing=False" in raw


def test_keras_v2_source_in_another_layout_and_dtype(made):
    result = convert_checkpoint(made["b0.keras"].src, layout="timm", dtype="float16")
    assert result.state_dict["conv_stem.weight"].dtype == torch.float16 and result.card["arch"] == "v2-b0"
    cfg = result.card["timm"]["pretrained_cfg"]
    np.testing.assert_allclose(cfg["mean"], np.array(IMAGENET_MEAN) / 255, rtol=1e-6)
    np.testing.assert_allclose(cfg["std"], np.array(IMAGENET_STD) / 255, rtol=1e-6)
