"""effconv eval on small generated folders, labelled with the model's own predictions so the answer is known."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from effconv.errors import UsageError
from effconv.models import load
from effconv.zoo.evaluation import evaluate, find_images
from effconv.zoo.inference import imagenet_classes, predict
from tests.support.helpers import run_cli
from tests.support.zoo_helpers import convert_to, one_torch_thread, photographs

WNIDS = [wnid for wnid, _ in imagenet_classes()]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def weights(fixture_ckpt, tmp_path_factory):
    return convert_to(fixture_ckpt, tmp_path_factory.mktemp("b0") / "b0.pth")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Eight images: the photographs and their mirror images, JPEG and PNG, flat in one folder."""
    folder = tmp_path_factory.mktemp("flat")
    paths = []
    for name, pixels in photographs().items():
        for flip, suffix in ((False, ".jpg"), (True, ".png")):
            paths.append(folder / f"{name}{'_flip' if flip else ''}{suffix}")
            Image.fromarray(np.ascontiguousarray(pixels[:, ::-1]) if flip else pixels).save(paths[-1])
    return sorted(paths)


@pytest.fixture(scope="module")
def predicted(weights, images) -> list[int]:
    return [r["top_k"][0]["label"] for r in predict(load(weights), images)]


def _class_folders(root, images, labels):
    for path, label in zip(images, labels, strict=True):
        (root / WNIDS[label]).mkdir(parents=True, exist_ok=True)
        (root / WNIDS[label] / path.name).write_bytes(path.read_bytes())
    return root


def test_class_folders_named_by_wordnet_id(weights, images, predicted, tmp_path):
    root = _class_folders(tmp_path / "val", images, predicted)
    result = evaluate(load(weights), root, batch_size=3)
    assert (result.images, result.top1, result.top5) == (8, 100.0, 100.0)
    assert result.details["layout"] == "class folders" and result.images_per_second > 0


def test_flat_folder_with_labels_file(weights, images, predicted, tmp_path):
    wrong = [(label + 1) % 1000 if i % 2 else label for i, label in enumerate(predicted)]  # every other one wrong
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"{p.name} {label}\n" for p, label in zip(images, wrong, strict=True)))
    result = evaluate(load(weights), images[0].parent, labels_file=labels, batch_size=4)
    assert result.top1 == 50.0 and result.top5 >= 50.0
    by_wnid = tmp_path / "wnids.csv"  # Kaggle-style: header, stem, WordNet id
    by_wnid.write_text(
        "ImageId,PredictionString\n" + "".join(f"{p.stem},{WNIDS[x]}\n" for p, x in zip(images, predicted, strict=True))
    )
    assert evaluate(load(weights), images[0].parent, labels_file=by_wnid).top1 == 100.0
    one_per_line = tmp_path / "one_per_line.txt"  # labels of the sorted image files
    one_per_line.write_text("".join(f"{x}\n" for x in predicted))
    result = evaluate(load(weights), images[0].parent, labels_file=one_per_line, limit=3)
    assert (result.images, result.top1) == (3, 100.0)


def test_sorted_folder_names_become_labels(tmp_path, images):
    for name in ("zebra", "apple"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.png").write_bytes(images[0].read_bytes())
    found = find_images(tmp_path)
    assert [p.parent.name for p in found.files] == ["apple", "zebra"] and found.labels == (0, 1)


def test_bad_inputs(tmp_path, images, weights):
    with pytest.raises(UsageError, match="no class sub-folders"):
        find_images(images[0].parent)
    (tmp_path / "n01440764").mkdir()
    with pytest.raises(UsageError, match="no images"):
        find_images(tmp_path)
    labels = tmp_path / "labels.txt"
    labels.write_text("missing.jpg 3\n")
    with pytest.raises(UsageError, match="not in"):
        find_images(images[0].parent, labels)
    labels.write_text("1\n2\n")
    with pytest.raises(UsageError, match="2 labels but"):
        find_images(images[0].parent, labels)
    labels.write_text("".join(f"{p.name} 1000\n" for p in images))
    with pytest.raises(UsageError, match="label 1000 does not exist"):
        evaluate(load(weights), images[0].parent, labels_file=labels)


def test_cli_eval_with_workers_writes_json(weights, images, predicted, tmp_path):
    root = _class_folders(tmp_path / "val", images, predicted)
    out = tmp_path / "result.json"
    args = ("eval", "--weights", weights, "--data", root, "--batch-size", "4", "--workers", "2", "--out", out, "-q")
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert "top-1 100.00 %" in result.output and "images/s" in result.output
    data = json.loads(out.read_text())
    assert data["images"] == 8 and data["top1"] == 100.0 and data["workers"] == 2
    assert data["preprocessing"]["image_size"] == 224 and data["weights"] == str(weights)
    result = run_cli("eval", "--weights", weights, "--data", root, "--limit", "2", "--out", tmp_path / "no/x.json")
    assert result.exit_code == 2 and "does not exist" in result.output
