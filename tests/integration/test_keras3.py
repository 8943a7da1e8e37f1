"""Issue 13: what Keras 3 users save (`.keras`, `.weights.h5`, SavedModels) converts to models that reproduce Keras.

Ground truth: `../shared/fixtures/keras3-b0` (EfficientNetB0, 10 classes, Keras 3.15) and its logits at 224 and
225 px; its two SavedModels are made here with Keras itself. Further files are made here by Keras too (small
input sizes): B0 and B3 with and without top, users' models with the backbone nested (Sequential and
functional, Dropout + Dense heads, a weights='imagenet' graph with its compensating Rescaling), a SavedModel of
one. Every source is converted by the CLI in one process where TensorFlow and Keras cannot be imported; the
converted models, fed raw pixels normalised as their cards say, must give Keras' own outputs.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import keras  # Keras 3: a missing Keras fails here, these tests must never be skipped
import numpy as np
import pytest
import tensorflow as tf
import torch

from effconv.convert import convert_checkpoint
from effconv.errors import CheckpointError, UsageError
from effconv.formats import find_format, local_files
from effconv.formats.keras import KERAS_IMAGENET_STD
from effconv.variants import IMAGENET_MEAN, IMAGENET_STD
from tests.support.helpers import run_cli
from tests.support.keras3_models import (
    FIXTURE,
    Case,
    assert_reproduces_keras,
    convert_without_tensorflow,
    fixture_oracle,
    imagenet_graph,
    randomise,
    reference,
    without_names,
)

SEED = 13
SIZE = 64  # the Keras-made models' input side: small, and a multiple of 32
# Keras' TF backend calls np.array(x, copy=False) on every weight it saves: noise, not a finding.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def oracle() -> dict[str, np.ndarray]:
    return fixture_oracle()


def _save(model, folder: Path, name: str, rng, *, weights: bool = False, **randomised) -> Path:
    """Randomise `model` and save it as `name`.keras (and `name`.weights.h5)."""
    randomise(model, rng, **randomised)
    path = folder / f"{name}.keras"
    model.save(path)
    if weights:
        model.save_weights(folder / f"{name}.weights.h5")
    return path


def _pixels(rng, size: int = SIZE) -> np.ndarray:
    return rng.integers(0, 256, (2, size, size, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def made(tmp_path_factory, oracle) -> dict[str, Case]:
    """Every source of these tests, converted (outputs beside them) in a process that cannot import TensorFlow."""
    tmp = tmp_path_factory.mktemp("keras3")
    rng = np.random.default_rng(SEED)
    keras.utils.set_random_seed(SEED)
    apps = keras.applications
    cases: dict[str, Case] = {}

    def add(name: str, src: Path, checks, output: str = "logits") -> None:
        cases[name] = Case(src, tmp / f"{name}.pth", checks, output)

    fixture_checks = [(oracle["x_224"], oracle["y_224"]), (oracle["x_225"], oracle["y_225"])]
    fixture_model = keras.models.load_model(FIXTURE / "model.keras")
    fixture_model.export(tmp / "fixture_export", verbose=False)
    tf.saved_model.save(fixture_model, str(tmp / "fixture_tf_saved_model"))
    add("fixture.keras", FIXTURE / "model.keras", fixture_checks)
    add("fixture.weights.h5", FIXTURE / "model.weights.h5", fixture_checks)
    add("fixture_export", tmp / "fixture_export", fixture_checks)
    add("fixture_tf_saved_model", tmp / "fixture_tf_saved_model", fixture_checks)

    # keras.applications itself, with and without top; B3 at 72 px has odd maps (9 px) where 'SAME' pads unevenly
    x, x72 = _pixels(rng), _pixels(rng, 72)
    b0 = apps.EfficientNetB0(weights=None, classes=7, input_shape=(SIZE, SIZE, 3))
    add("b0.keras", _save(b0, tmp, "b0", rng), [(x, reference(b0, x))])
    b0f = apps.EfficientNetB0(weights=None, include_top=False, input_shape=(SIZE, SIZE, 3))
    add("b0_features.keras", _save(b0f, tmp, "b0_features", rng), [(x, reference(b0f, x))], "features")
    b3 = apps.EfficientNetB3(weights=None, classes=4, input_shape=(72, 72, 3), classifier_activation=None)
    add("b3.keras", _save(b3, tmp, "b3", rng), [(x72, reference(b3, x72))])
    # built without an input size (Keras pads as for even maps: TF 'SAME' at 64 px)
    b3p = apps.EfficientNetB3(weights=None, include_top=False, pooling="avg")
    path = _save(b3p, tmp, "b3_pooled", rng, weights=True)
    add("b3_pooled.keras", path, [(x, reference(b3p, x))], "pooled")
    add("b3_pooled.weights.h5", tmp / "b3_pooled.weights.h5", cases["b3_pooled.keras"].checks, "pooled")

    # the commonest real file: an ImageNet-graph backbone fine-tuned with the user's Dropout + Dense head
    with imagenet_graph():
        base = apps.EfficientNetB0(include_top=False, pooling="avg", input_shape=(SIZE, SIZE, 3))
    tuned = keras.Sequential(
        [keras.Input((SIZE, SIZE, 3)), base, keras.layers.Dropout(0.3), keras.layers.Dense(5, activation="softmax")]
    )
    path = _save(tuned, tmp, "tuned", rng, weights=True)
    tf.saved_model.save(tuned, str(tmp / "tuned_saved_model"))
    checks = [(x, reference(tuned, x))]
    add("tuned.keras", path, checks)
    add("tuned.weights.h5", tmp / "tuned.weights.h5", checks)
    add("tuned_saved_model", tmp / "tuned_saved_model", checks)

    # a functional user model: augmentation before the nested backbone, the user's own pooling, a linear Dense
    inputs = keras.Input((SIZE, SIZE, 3))
    features = apps.EfficientNetB0(weights=None, include_top=False, input_shape=(SIZE, SIZE, 3))
    y = features(keras.layers.RandomFlip("horizontal")(inputs))
    y = keras.layers.Dense(3)(keras.layers.Dropout(0.2)(keras.layers.GlobalAveragePooling2D()(y)))
    functional = keras.Model(inputs, y)
    path = _save(functional, tmp, "functional", rng, normalization=([0.4, 0.5, 0.6], [0.05, 0.06, 0.07]))
    add("functional.keras", path, [(x, reference(functional, x))])

    # the backbone's layers flattened into the user's model (input_tensor=, base.output), a sigmoid head
    inputs = keras.Input((SIZE, SIZE, 3))
    flat = apps.EfficientNetB0(weights=None, include_top=False, input_tensor=inputs)
    y = keras.layers.GlobalAveragePooling2D()(flat.output)
    flat = keras.Model(inputs, keras.layers.Dense(4, activation="sigmoid")(keras.layers.Dropout(0.5)(y)))
    _save(flat, tmp, "flat", rng, weights=True)
    checks = [(x, reference(flat, x))]
    add("flat.keras", tmp / "flat.keras", checks)
    add("flat.weights.h5", tmp / "flat.weights.h5", checks)

    convert_without_tensorflow(cases.values())
    return cases


CASES = [
    "fixture.keras",
    "fixture.weights.h5",
    "fixture_export",
    "fixture_tf_saved_model",
    "b0.keras",
    "b0_features.keras",
    "b3.keras",
    "b3_pooled.keras",
    "b3_pooled.weights.h5",
    "tuned.keras",
    "tuned.weights.h5",
    "tuned_saved_model",
    "functional.keras",
    "flat.keras",
    "flat.weights.h5",
]


@pytest.mark.parametrize("name", CASES)
def test_converted_model_reproduces_keras(made, name):
    assert_reproduces_keras(made[name], name)


def test_fixture_card_folds_the_graphs_own_normalisation(made):
    card = json.loads(made["fixture.keras"].out.with_suffix(".json").read_text())
    pre = card["preprocessing"]
    # weights=None graph: Rescaling(1/255), then Normalization by the stored values, no compensating Rescaling
    np.testing.assert_allclose(pre["mean"], [123.675, 116.28, 103.53], rtol=1e-6)
    np.testing.assert_allclose(pre["std"], np.sqrt(KERAS_IMAGENET_STD) * 255, rtol=1e-6)
    steps = card["input_normalization"]["steps"]
    assert len(steps) == 2 and "(Rescaling)" in steps[0] and "(Normalization)" in steps[1]
    source = card["source"]
    assert source["format"] == "keras3-archive" and source["keras_version"] == "3.15.1"
    assert source["built_input_size"] == [224, 224] and "TF 'SAME' for 224x224" in source["padding"]
    assert source["output_activation"] == "softmax" and "softmax" in source["output"]
    assert [(h["layer"], h["class"]) for h in source["head"]] == [
        ("avg_pool", "GlobalAveragePooling2D"),
        ("top_dropout", "Dropout"),
        ("predictions", "Dense"),
    ]
    assert card["num_classes"] == 10 and card["arch"] == "b0"
    assert sorted(card["skipped"]) == ["normalization/count", "normalization/mean", "normalization/variance"]
    for name in ("fixture.weights.h5", "fixture_export", "fixture_tf_saved_model"):
        other = json.loads(made[name].out.with_suffix(".json").read_text())
        np.testing.assert_allclose(other["preprocessing"]["std"], pre["std"], rtol=1e-6)


def test_saved_models_name_their_writer_and_check_the_second_copy(made):
    export = json.loads(made["fixture_export"].out.with_suffix(".json").read_text())
    assert export["source"]["saved_as"].startswith("model.export")
    copies = {k: r for k, r in export["skipped"].items() if k.startswith("_all_variables/")}
    assert len(copies) >= 311 and all(r.startswith("second copy of ") for r in copies.values())
    assert export["source"]["serving_graph"]["input_shape"] == [-1, 224, 224, 3]
    saved = json.loads(made["fixture_tf_saved_model"].out.with_suffix(".json").read_text())
    assert saved["source"]["saved_as"].startswith("tf.saved_model.save") and saved["source"]["output_activation"]


def test_fine_tuned_imagenet_graph_folds_to_imagenet_mean_std(made):
    """weights='imagenet' graphs add Rescaling(1/sqrt(std)); each container shows it and the fold undoes the quirk."""
    for name in ("tuned.keras", "tuned.weights.h5", "tuned_saved_model"):
        card = json.loads(made[name].out.with_suffix(".json").read_text())
        np.testing.assert_allclose(card["preprocessing"]["mean"], IMAGENET_MEAN, rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(card["preprocessing"]["std"], IMAGENET_STD, rtol=1e-6, err_msg=name)
        assert card["variant"] == "standard" and len(card["input_normalization"]["steps"]) == 3, name
        assert card["num_classes"] == 5 and card["source"]["backbone"] in (
            "efficientnetb0",
            "not named in a SavedModel",
        )
    keras_card = json.loads(made["tuned.keras"].out.with_suffix(".json").read_text())
    head = keras_card["source"]["head"]
    assert [h["class"] for h in head] == ["GlobalAveragePooling2D", "Dropout", "Dense"] and head[1]["rate"] == 0.3
    assert head[2]["activation"] == "softmax" and keras_card["source"]["keras_model"] == "sequential"


def test_flattened_backbone_and_sigmoid_head(made):
    card = json.loads(made["flat.keras"].out.with_suffix(".json").read_text())
    assert card["source"]["output_activation"] == "sigmoid" and card["num_classes"] == 4
    assert card["source"]["backbone"] == card["source"]["keras_model"]  # not nested: the user's model itself
    weights = json.loads(made["flat.weights.h5"].out.with_suffix(".json").read_text())
    assert "not recorded" in weights["source"]["output"] and weights["source"]["output_activation"] is None


def test_feature_extractors_have_no_classes(made):
    features = json.loads(made["b0_features.keras"].out.with_suffix(".json").read_text())
    assert features["num_classes"] == 0 and "feature map" in features["source"]["output"]
    pooled = json.loads(made["b3_pooled.weights.h5"].out.with_suffix(".json").read_text())
    assert pooled["num_classes"] == 0 and "pooled" in pooled["source"]["output"] and pooled["arch"] == "b3"
    built = json.loads(made["b3_pooled.keras"].out.with_suffix(".json").read_text())["source"]
    assert built["built_input_size"] is None and "even-sized maps" in built["padding"]


def test_weights_file_without_layer_names_is_rebuilt_from_the_architecture(made, tmp_path):
    """Keras before 3.6 wrote no layer names: the layers are rebuilt from keras.applications' order by class."""
    for name in ("fixture.weights.h5", "tuned.weights.h5"):
        bare = tmp_path / name
        without_names(made[name].src, bare)
        named, rebuilt = convert_checkpoint(made[name].src), convert_checkpoint(bare)
        assert (
            "rebuilt" in rebuilt.card["source"]["layers_from"]
            and "names the weights" in named.card["source"]["layers_from"]
        )
        assert named.state_dict.keys() == rebuilt.state_dict.keys()
        assert all(torch.equal(v, rebuilt.state_dict[k]) for k, v in named.state_dict.items()), name
        assert named.card["preprocessing"] == rebuilt.card["preprocessing"]
    with pytest.raises(UsageError, match="holds b0|fits no|it holds b0"):
        convert_checkpoint(tmp_path / "fixture.weights.h5", arch="b2")


def test_ambiguous_weights_file_asks_for_arch(made, tmp_path, monkeypatch):
    """Where two archs fit a file without layer names, --arch decides (here: lite0 made a Keras arch that a
    weights file cannot tell from b0)."""
    from effconv.formats import keras3_graph
    from effconv.mappings import keras as keras_rows

    signature = keras3_graph._signature
    monkeypatch.setitem(keras_rows.KERAS_APPLICATIONS, "EfficientNetLite0", "lite0")
    monkeypatch.setattr(keras3_graph, "_signature", lambda arch: signature("b0" if arch == "lite0" else arch))
    bare = tmp_path / "bare.weights.h5"
    without_names(made["fixture.weights.h5"].src, bare)
    with pytest.raises(UsageError, match="fits b0, lite0.*--arch"):
        convert_checkpoint(bare)
    assert convert_checkpoint(bare, arch="b0").card["arch"] == "b0"


def _head_model(folder: Path, name: str, head) -> Path:
    inputs = keras.Input((32, 32, 3))
    y = keras.applications.EfficientNetB0(weights=None, include_top=False, input_shape=(32, 32, 3))(inputs)
    for layer in head:
        y = layer(y)
    path = folder / f"{name}.keras"
    keras.Model(inputs, y).save(path)
    return path


def test_heads_effconv_cannot_express_are_refused_naming_the_layer(tmp_path):
    layers = keras.layers
    heads = {
        "two_dense": ([layers.GlobalAveragePooling2D(), layers.Dense(16, activation="relu"), layers.Dense(3)], "Dense"),
        "flatten": ([layers.Flatten(), layers.Dense(3)], "Flatten"),
        "max_pool": ([layers.GlobalMaxPooling2D(), layers.Dense(3)], "GlobalMaxPooling2D"),
    }
    for name, (head, kind) in heads.items():
        path = _head_model(tmp_path, name, head)
        result = run_cli("convert", "--src", path, "--out", tmp_path / f"{name}.pth")
        assert result.exit_code == 2 and f"a {kind} layer" in result.stderr, (name, result.stderr)
        assert not (tmp_path / f"{name}.pth").exists()


def test_inspect_describes_keras3_sources(made):
    result = run_cli("inspect", "--src", made["tuned.keras"].src)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "Keras 3 .keras archive" in out and "b0 (16 blocks)" in out and "backbone efficientnetb0" in out
    assert "dropout (Dropout), dense (Dense)" in out and "softmax" in out and "built for:   [64, 64]" in out
    report = json.loads(run_cli("inspect", "--src", made["fixture_export"].src, "--json").output)
    assert report["format"] == "keras3-saved-model" and report["model_variables"] == 311
    assert not report["missing"] and report["unknown_variables"] == [] and report["num_classes"] == 10


def test_keras3_source_in_other_layouts_and_dtypes(made):
    result = convert_checkpoint(made["fixture.keras"].src, layout="timm", dtype="float16")
    assert result.state_dict["conv_stem.weight"].dtype == torch.float16
    np.testing.assert_allclose(result.card["timm"]["pretrained_cfg"]["std"], np.sqrt(KERAS_IMAGENET_STD), rtol=1e-6)


def test_compressed_archive_is_extracted_to_a_temporary_file(made, tmp_path):
    src = made["fixture.keras"].src
    squeezed = tmp_path / "squeezed.keras"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(squeezed, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
    a, b = convert_checkpoint(src), convert_checkpoint(squeezed)
    assert b.card["source"]["weights_in_archive"].startswith("compressed")
    assert all(torch.equal(v, b.state_dict[k]) for k, v in a.state_dict.items())


def test_broken_and_misnamed_keras3_files_fail_clearly(made, tmp_path):
    src = made["fixture.keras"].src
    (tmp_path / "cut.keras").write_bytes(src.read_bytes()[: 2**20])
    result = run_cli("convert", "--src", tmp_path / "cut.keras", "--out", tmp_path / "x.pth")
    assert result.exit_code == 2 and "not a readable .keras archive" in result.stderr
    with zipfile.ZipFile(tmp_path / "no_weights.keras", "w") as z:
        z.writestr("config.json", "{}")
    with pytest.raises(CheckpointError, match="no model.weights.h5"):
        convert_checkpoint(tmp_path / "no_weights.keras")
    # a legacy Keras .h5 that happens to be named .weights.h5 is read as legacy
    legacy = tmp_path / "legacy.weights.h5"
    keras.models.load_model(made["b0.keras"].src).save(tmp_path / "legacy.h5")
    (tmp_path / "legacy.h5").rename(legacy)
    assert convert_checkpoint(legacy).card["source"]["format"] == "keras-h5"


def test_a_flipped_byte_in_the_object_graph_is_caught(made, tmp_path):
    from effconv.formats.bundle import TensorBundleReader

    copy = tmp_path / "export"
    shutil.copytree(made["fixture_export"].src, copy)
    with TensorBundleReader(copy / "variables" / "variables") as reader:
        info = reader.info("_CHECKPOINTABLE_OBJECT_GRAPH")
        shard = reader.shard_paths[info.shard]
    with open(shard, "r+b") as f:
        f.seek(info.offset + info.size - 10)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x20]))
    with pytest.raises(CheckpointError, match="crc32c mismatch in _CHECKPOINTABLE_OBJECT_GRAPH"):
        convert_checkpoint(copy)


def test_registry_finds_keras3_sources(made):
    assert find_format(made["fixture.keras"].src).name == "keras3-archive"
    assert find_format(made["fixture.weights.h5"].src).name == "keras3-weights"
    assert find_format(made["fixture_export"].src).name == "keras3-saved-model"
    assert find_format(made["fixture_export"].src / "saved_model.pb").name == "keras3-saved-model"
    names = [p.name for p in local_files(made["fixture_export"].src)]
    assert names[:2] == ["saved_model.pb", "variables.index"] and names[2].startswith("variables.data-")
