"""effconv eval --against-tf: the images of an evaluation also through TensorFlow's preprocessing ops and the TF
reference model built from the source checkpoint, the two frameworks compared image by image.

A synthesised 6-class b0 converted for 64 px inputs, and 31 small seeded images (JPEG and one PNG) in 6 class
folders: a faithful conversion agrees on every image within the float32 tolerance, a conversion with one block's
weights changed is caught, and every way of asking for the comparison without what it needs is a usage error.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from effconv.convert import convert_checkpoint
from effconv.models import load
from effconv.output.artifact import write_artifact
from effconv.parity.synth import write_synthetic_checkpoint
from effconv.variants import preprocessing
from effconv.zoo.against_tf import AgainstTF, build_reference, tf_preprocess
from effconv.zoo.evaluation import evaluate
from effconv.zoo.inference import card_preprocessing, prepare
from tests.support.eval_data import image_folder
from tests.support.helpers import run_cli, tolerance
from tests.support.zoo_helpers import one_torch_thread

CLASSES = ("a", "b", "c", "d", "e", "f")
PER_CLASS = 5
IMAGES = len(CLASSES) * PER_CLASS + 1  # and one PNG
SIZE = 64


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(checkpoint, converted weights, image folder)."""
    root = tmp_path_factory.mktemp("against-tf")
    ckpt = root / "efficientnet-b0"
    write_synthetic_checkpoint("b0", ckpt, num_classes=len(CLASSES), seed=3)
    result = convert_checkpoint(ckpt, image_size=SIZE, variant="standard")
    weights, _ = write_artifact(result.state_dict, result.card, root / "b0.pth")
    data = image_folder(root / "val", classes=CLASSES, per_class=PER_CLASS, seed=1)
    pixels = np.asarray(Image.open(data / "c" / "img000.jpg"))[:, ::-1]  # a mirror image, as PNG
    Image.fromarray(np.ascontiguousarray(pixels)).save(data / "c" / "mirror.png")
    return ckpt, weights, data


def _eval(folder: Path, weights: Path, data: Path, *extra) -> tuple:
    """effconv eval in this process: (click's result, the JSON result or None)."""
    out = folder / f"{weights.stem}-eval.json"
    result = run_cli("eval", "--weights", weights, "--data", data, "--out", out, "--batch-size", 8, "-q", *extra)
    return result, (json.loads(out.read_text()) if out.exists() else None)


def test_a_faithful_conversion_agrees_on_every_image(setup, tmp_path):
    ckpt, weights, data = setup
    # the source from the card's recorded path; two DataLoader workers started after TensorFlow
    result, report = _eval(tmp_path, weights, data, "--against-tf", "--workers", 2)
    assert result.exit_code == 0, result.output
    figures = report["against_tf"]
    assert figures["source"] == str(ckpt) and figures["weights"] == "ema" and figures["arch"] == "b0"
    assert figures["images"] == report["images"] == IMAGES
    assert figures["top1_agreement"] == 1.0 and figures["top1_differ"] == [] and figures["passed"]
    limit = tolerance(figures["max_abs_tf_logit"])
    assert 0 < figures["p999_abs_logit_diff"] <= figures["max_abs_logit_diff"] <= limit
    assert figures["max_abs_tf_logit"] > 10  # logits of a real scale, not vanishing ones that agree trivially
    assert figures["preprocessing_max_abs"] == 0.0  # TF's ops and effconv's pipeline: the same bits
    assert (figures["tf_top1"], figures["tf_top5"]) == (report["top1"], report["top5"])
    assert 0 < report["top1"] < 100  # the labels are not trivially all right or all wrong
    assert "top-1 agreement 100.00 % (0 of 31 images differ)" in result.output


def test_a_block_changed_in_the_converted_file_shows_in_the_report(setup, tmp_path):
    ckpt, weights, data = setup
    state = torch.load(weights, weights_only=True)
    generator = torch.Generator().manual_seed(0)
    for name in [n for n in state if n.startswith("blocks.5.") and n.endswith("conv.weight")]:
        state[name] = torch.randn(state[name].shape, generator=generator) * state[name].std()
    broken = tmp_path / "broken.pth"
    torch.save(state, broken)
    shutil.copy(weights.with_suffix(".json"), broken.with_suffix(".json"))
    result, report = _eval(tmp_path, broken, data, "--against-tf", "--src", ckpt, "--workers", 0)
    assert result.exit_code == 1, result.output  # a parity failure, and the report written all the same
    figures = report["against_tf"]
    assert not figures["passed"] and figures["beyond_tolerance_count"] > IMAGES // 2
    differ = figures["top1_differ"]
    assert figures["top1_agreement"] < 1.0 and differ
    assert figures["top1_differ_count"] == len(differ) == round((1 - figures["top1_agreement"]) * IMAGES)
    assert all(Path(p).is_file() and Path(p).is_relative_to(data) for p in differ)
    assert figures["max_abs_logit_diff"] > 100 * tolerance(figures["max_abs_tf_logit"])
    assert figures["preprocessing_max_abs"] == 0.0  # the inputs were the same: the weights are what differs
    # the TF side is the checkpoint's network: its accuracy is the faithful conversion's, not the broken one's
    faithful = _eval(tmp_path, weights, data, "--workers", 0)[1]
    assert (figures["tf_top1"], figures["tf_top5"]) == (faithful["top1"], faithful["top5"])
    assert "FAIL:" in result.output


def test_images_resumed_from_a_predictions_file_are_left_out_and_said(setup, tmp_path):
    ckpt, weights, data = setup
    model = load(weights)
    predictions = tmp_path / "p.jsonl"
    evaluate(model, data, batch_size=8, predictions=predictions)
    lines = predictions.read_bytes().splitlines(keepends=True)
    predictions.write_bytes(b"".join(lines[: 1 + 10]))  # the header and 10 images done
    against = AgainstTF(build_reference(ckpt, model.card), card_preprocessing(model), model.card.dtype)
    result = evaluate(model, data, batch_size=8, predictions=predictions, against_tf=against)
    figures = result.details["against_tf"]
    assert (result.images, figures["images"]) == (IMAGES, IMAGES - 10) and figures["passed"]
    assert any("10 image(s) resumed" in note for note in figures["notes"])


@pytest.mark.parametrize(
    ("variant", "arch", "size"),
    [("standard", "b0", 64), ("standard", "b3", 91), ("standard", "v2-s", 60), ("in21k-ft1k", "v2-b0", 64)],
)
def test_tensorflow_side_preprocesses_as_the_card_says(setup, variant, arch, size):
    """TF1 bicubic cards and EfficientNetV2's (crop below 320 px, none for the 21k-ft1k releases): same bits."""
    card = preprocessing(variant, size, arch)
    images = sorted(setup[2].rglob("*.*"))[::5]
    assert any(path.suffix == ".png" for path in images)
    for path in images:
        ours = prepare(path, card).transpose(1, 2, 0)
        assert np.array_equal(tf_preprocess(path, card), ours), (arch, path.name)


def test_usage_errors(setup, tmp_path, monkeypatch):
    ckpt, weights, data = setup

    def refused(*extra, weights=weights, match):
        result, report = _eval(tmp_path, weights, data, *extra)
        assert result.exit_code == 2 and report is None, result.output
        assert match in result.output, result.output

    no_source = tmp_path / "no-source.pth"
    shutil.copy(weights, no_source)
    card = json.loads(weights.with_suffix(".json").read_text())
    card["source"].pop("path")
    no_source.with_suffix(".json").write_text(json.dumps(card))
    refused("--against-tf", weights=no_source, match="its card records no source path; give --src CHECKPOINT")
    moved = tmp_path / "moved.pth"
    shutil.copy(weights, moved)
    card["source"]["path"] = str(tmp_path / "gone")
    moved.with_suffix(".json").write_text(json.dumps(card))
    refused("--against-tf", weights=moved, match="which is not there")
    refused("--against-tf", "--src", tmp_path / "nothing", match="nothing")
    refused("--src", ckpt, match="without --against-tf leave it out")
    refused("--against-tf", "--nproc", 2, match="--against-tf runs in one process")
    refused("--against-tf", "--amp", "bf16", match="leave out --amp bf16")
    with monkeypatch.context() as patched:  # a process of a torchrun world of 2
        patched.setenv("RANK", "0")
        patched.setenv("WORLD_SIZE", "2")
        refused("--against-tf", match="not 2: leave out --nproc / torchrun")
    with monkeypatch.context() as patched:
        patched.setitem(sys.modules, "tensorflow", None)  # `import tensorflow` fails as where it is not installed
        refused("--against-tf", "--src", ckpt, match="effconv eval --against-tf needs TensorFlow")
