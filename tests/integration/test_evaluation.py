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


def _one_line_error(result, needle: str):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("effconv: error: ") and needle in lines[0], result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("device,needle", [("cuda", "sees no cuda device"), ("foo", "'foo' is not a device")])
def test_cli_eval_device_is_checked_first(weights, images, tmp_path, monkeypatch, device, needle):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # a CPU-only torch, even on a GPU machine
    result = run_cli("eval", "--weights", weights, "--data", images[0].parent, "--device", device)
    _one_line_error(result, needle)


def _with_a_bad_image(root, images, predicted):
    _class_folders(root, images, predicted)
    bad = root / WNIDS[predicted[0]] / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff" + b"not a jpeg at all" * 20)
    return bad


def test_a_bad_image_stops_eval_with_its_name(weights, images, predicted, tmp_path):
    bad = _with_a_bad_image(tmp_path / "val", images, predicted)
    args = ("eval", "--weights", weights, "--data", tmp_path / "val", "--workers", "2", "-q")
    result = run_cli(*args, "--out", tmp_path / "r.json")
    _one_line_error(result, f"cannot read image {bad}")
    assert "BytesIO" not in result.stderr and "DataLoader worker" not in result.stderr and "--skip-bad" in result.stderr
    assert not (tmp_path / "r.json").exists()


def test_skip_bad_counts_and_lists_the_skipped(weights, images, predicted, tmp_path):
    bad = _with_a_bad_image(tmp_path / "val", images, predicted)
    out = tmp_path / "r.json"
    result = run_cli("eval", "--weights", weights, "--data", tmp_path / "val", "--skip-bad", "--out", out, "-q")
    assert result.exit_code == 0, result.output
    assert "skipped 1 unreadable image" in result.stderr
    data = json.loads(out.read_text())
    assert (data["images"], data["top1"], data["skipped_count"]) == (8, 100.0, 1)
    assert data["skipped"][0]["file"] == str(bad) and "cannot read image" in data["skipped"][0]["error"]


def test_eval_refuses_to_overwrite_its_result(weights, images, predicted, tmp_path, monkeypatch):
    root = _class_folders(tmp_path / "val", images, predicted)
    monkeypatch.chdir(tmp_path)
    default = tmp_path / f"{weights.stem}-eval.json"
    default.write_text("precious")
    result = run_cli("eval", "--weights", weights, "--data", root, "--limit", "1", "-q")
    _one_line_error(result, "output exists")
    assert default.read_text() == "precious"
    forced = run_cli("eval", "--weights", weights, "--data", root, "--limit", "1", "-q", "--force")
    assert forced.exit_code == 0, forced.output
    assert json.loads(default.read_text())["images"] == 1


def _ten_class_model(weights):
    import torch

    model = load(weights)
    model.reset_classifier(10)
    torch.nn.init.zeros_(model.classifier.weight)
    with torch.no_grad():
        model.classifier.bias.copy_(torch.arange(10.0))  # every image is predicted as class 9
    return model


def test_a_small_head_takes_sorted_folder_labels_not_imagenet_ids(weights, images, tmp_path):
    folders = sorted(WNIDS[i] for i in (812, 3, 500))  # Imagenette-style WordNet names
    for folder in folders:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.png").write_bytes(images[0].read_bytes())
    assert find_images(tmp_path, num_classes=10).labels == (0, 1, 2)
    assert find_images(tmp_path, num_classes=1000).labels == tuple(sorted((812, 3, 500)))
    result = evaluate(_ten_class_model(weights), tmp_path)  # no "label 812 does not exist"
    assert result.images == 3 and result.top1 == 0.0
    class_map = tmp_path / "classes.txt"
    class_map.write_text("".join(f"{folder} 9\n" for folder in folders))
    from effconv.zoo.evaluation import read_class_map

    result = evaluate(_ten_class_model(weights), tmp_path, class_map=read_class_map(class_map))
    assert result.top1 == 100.0
    class_map.write_text(f"{folders[0]}\n")
    with pytest.raises(UsageError, match="does not list the folder"):
        find_images(tmp_path, class_map=read_class_map(class_map))
