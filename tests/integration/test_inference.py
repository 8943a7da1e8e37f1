"""predict, inference_model and get_model: the card's preprocessing, ImageNet names, the cache."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
import torch

import effconv
from effconv.errors import UsageError
from effconv.models import create_model, load
from effconv.variants import ADVPROP_MEAN, ADVPROP_STD, IMAGENET_MEAN, IMAGENET_STD
from effconv.zoo import preprocess as pp
from effconv.zoo.inference import class_names, imagenet_classes, inference_model, predict
from tests.support.helpers import run_cli
from tests.support.mirror_server import serve
from tests.support.zoo_helpers import convert_to, one_torch_thread, write_photos


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def weights(fixture_ckpt, tmp_path_factory):
    return convert_to(fixture_ckpt, tmp_path_factory.mktemp("b0") / "b0.pth")


@pytest.fixture(scope="module")
def advprop_weights(fixture_ckpt, tmp_path_factory):
    return convert_to(fixture_ckpt, tmp_path_factory.mktemp("b0ap") / "b0-ap.pth", variant="advprop")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_photos(tmp_path_factory.mktemp("photos"))


def _logits(model, path, mean, std) -> torch.Tensor:
    x = pp.preprocess(path, 224, mean, std).transpose(2, 0, 1)[None]
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(x)))[0]


def test_imagenet_class_list():
    classes = imagenet_classes()
    assert len(classes) == 1000 and len({wnid for wnid, _ in classes}) == 1000
    assert [wnid for wnid, _ in classes] == sorted(wnid for wnid, _ in classes)  # label order = sorted WordNet ids
    assert classes[0] == ("n01440764", "tench, Tinca tinca") and classes[1][1].startswith("goldfish")
    assert classes[999] == ("n15075141", "toilet tissue, toilet paper, bathroom tissue")
    assert class_names(1001)[:2] == ["background", "tench, Tinca tinca"]
    assert class_names(3) == ["class_0", "class_1", "class_2"]


def test_inference_model_uses_the_card(weights, advprop_weights, photos):
    """Same weights, cards saying other normalisations: each result is the one of its card's preprocessing."""
    top5 = {}
    for path, mean, std in ((weights, IMAGENET_MEAN, IMAGENET_STD), (advprop_weights, ADVPROP_MEAN, ADVPROP_STD)):
        model = load(path)
        result = inference_model(model, photos[0])
        logits = _logits(model, photos[0], mean, std)
        # Probabilities have a known scale (<= 1), and both come from the same model on the same pixels.
        assert np.allclose(result["pred_scores"], torch.softmax(logits, 0).numpy(), atol=1e-6)
        assert result["pred_label"] == int(logits.argmax())
        assert result["pred_class"] == imagenet_classes()[result["pred_label"]][1]
        top5[path] = [g["label"] for g in predict(model, [photos[0]])[0]["top_k"]]
        assert top5[path] == logits.topk(5).indices.tolist()
    assert top5[weights] != top5[advprop_weights]


def test_inference_model_inputs_agree(weights, photos):
    model = load(weights)
    by_path = inference_model(model, photos[1])
    by_bytes = inference_model(model, photos[1].read_bytes())
    by_array = inference_model(model, pp.decode_image(photos[1]))
    for other in (by_bytes, by_array):
        assert np.array_equal(other["pred_scores"], by_path["pred_scores"])
    assert by_path["pred_scores"].shape == (1000,) and by_path["pred_scores"].sum() == pytest.approx(1, abs=1e-5)


def test_inference_model_needs_a_card_or_settings(photos):
    bare = create_model("b0", 10)
    with pytest.raises(UsageError, match="no model card"):
        inference_model(bare, photos[0])
    result = inference_model(bare, photos[0], preprocessing={"image_size": 64, "mean": [0] * 3, "std": [255] * 3})
    assert result["pred_class"].startswith("class_") and result["pred_scores"].shape == (10,)
    headless = create_model("b0", 0)
    headless.card = {"preprocessing": {"image_size": 64, "mean": [0] * 3, "std": [1] * 3}}
    with pytest.raises(UsageError, match="extract_feat"):
        inference_model(headless, photos[0])


def test_predict_batches_and_top_k(weights, photos):
    model = load(weights)
    results = predict(model, photos, top_k=3, batch_size=3)  # two batches, the second of one image
    assert [r["image"] for r in results] == [str(p) for p in photos]
    for path, result in zip(photos, results, strict=True):
        assert len(result["top_k"]) == 3
        scores = [g["score"] for g in result["top_k"]]
        assert scores == sorted(scores, reverse=True)
        assert result["top_k"][0]["label"] == inference_model(model, path)["pred_label"]


def test_cli_predict(weights, photos):
    result = run_cli("predict", "--weights", weights, *photos[:2], "--top-k", "2")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == str(photos[0]) and lines[1].strip().startswith("1.") and len(lines) == 6
    data = json.loads(run_cli("predict", "--weights", weights, photos[2], "--json").output)
    assert len(data) == 1 and len(data[0]["top_k"]) == 5
    assert data[0]["top_k"][0]["class"] == imagenet_classes()[data[0]["top_k"][0]["label"]][1]
    bad = run_cli("predict", "--weights", weights, weights.with_suffix(".json"))
    assert bad.exit_code == 2 and "cannot read image" in bad.output


def test_import_is_light_and_api_lazy():
    import subprocess
    import sys

    code = "import sys, effconv; light = 'torch' not in sys.modules; effconv.get_model, effconv.inference_model"
    code += "; print(light)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "True"


def test_get_model_from_a_file(weights):
    model = effconv.get_model(weights)
    assert not model.training and model.card["arch"] == "b0"
    with pytest.raises(UsageError, match="neither a converted .pth file nor a catalogue name"):
        effconv.get_model("no-such-model")


def test_get_model_downloads_converts_and_caches(fixture_ckpt, weights, tmp_path, monkeypatch):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:  # plain tar behind a .tar.gz name, as some official ones
        tar.add(fixture_ckpt, arcname="efficientnet-b0")
    monkeypatch.setenv("EFFCONV_CACHE", str(tmp_path / "cache"))
    with serve({"/ckpts/efficientnet-b0.tar.gz": buf.getvalue()}) as mirror:
        monkeypatch.setenv("EFFCONV_BASE_URL", mirror.url)
        model = effconv.get_model("tf_efficientnet_b0.in1k")
        assert len(mirror.requests) == 1
    digest = hashlib.sha256(buf.getvalue()).hexdigest()  # the cache is keyed by the tarball's sha256
    cached = tmp_path / "cache" / "models" / f"efficientnet-b0_3rdparty_8xb32_in1k.{digest[:16]}.pth"
    assert cached.is_file() and model.card["catalogue_name"] == "efficientnet-b0_3rdparty_8xb32_in1k"
    assert model.card["source"]["archive"] == {"file": "ckpts/efficientnet-b0.tar.gz", "sha256": digest}
    assert not model.training and model.card["variant"] == "standard"
    reference = load(weights).state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
    again = effconv.get_model("efficientnet-b0_3rdparty_8xb32_in1k")  # the server is gone: from the cache
    assert again.card == model.card


def test_inference_model_takes_a_list(weights, photos):
    model = load(weights)
    results = inference_model(model, [photos[0], photos[1].read_bytes(), pp.decode_image(photos[2])], batch_size=2)
    assert isinstance(results, list) and len(results) == 3
    for path, result in zip(photos[:3], results, strict=True):
        single = inference_model(model, path)
        assert result["pred_label"] == single["pred_label"] and result["pred_class"] == single["pred_class"]
        assert np.allclose(result["pred_scores"], single["pred_scores"], atol=1e-6)  # probabilities: scale 1


def test_cli_predict_goes_on_past_a_bad_file(weights, photos, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff" + b"garbage" * 50)
    result = run_cli("predict", "--weights", weights, photos[0], bad, photos[1], "--top-k", "1")
    assert result.exit_code == 2
    assert result.stdout.splitlines()[0::2] == [str(photos[0]), str(photos[1])]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"effconv: error: cannot read image {bad}") and "BytesIO" not in line
    data = json.loads(run_cli("predict", "--weights", weights, bad, photos[0], "--json").stdout)
    assert "cannot read image" in data[0]["error"] and "top_k" not in data[0] and len(data[1]["top_k"]) == 5


def test_cli_predict_takes_a_folder_a_device_and_class_names(weights, photos, tmp_path, monkeypatch):
    names = tmp_path / "names.txt"
    names.write_text("".join(f"thing {i}\n" for i in range(1000)))
    folder = photos[0].parent
    result = run_cli("predict", "--weights", weights, folder, "--device", "cpu", "--class-names", names, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [r["image"] for r in data] == [str(p) for p in sorted(photos)]
    assert all(g["class"] == f"thing {g['label']}" for r in data for g in r["top_k"])
    names.write_text("cat\ndog\n")
    short = run_cli("predict", "--weights", weights, folder, "--class-names", names)
    assert short.exit_code == 2 and "names 2 classes, but the model has 1000" in short.stderr
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    for device, needle in (("cuda", "sees no cuda device"), ("foo", "is not a device")):
        bad = run_cli("predict", "--weights", weights, folder, "--device", device)
        assert bad.exit_code == 2 and needle in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    (tmp_path / "empty").mkdir()
    empty = run_cli("predict", "--weights", weights, tmp_path / "empty")
    assert empty.exit_code == 2 and "no images" in empty.stderr


def test_get_model_takes_pretrained_num_classes_and_device(weights, photos, monkeypatch):
    random_b0 = effconv.get_model("efficientnet-b0", pretrained=False, num_classes=7)
    assert random_b0.arch == "b0" and random_b0.num_classes == 7 and not random_b0.training
    assert effconv.get_model("tf_efficientnet_b3.ap_in1k", pretrained=False).arch == "b3"  # a catalogue name
    from_path = effconv.get_model("b0", pretrained=weights, num_classes=10, device="cpu")
    assert from_path.classifier.weight.shape == (10, 1280) and from_path.card.num_classes == 10
    reference = load(weights).state_dict()
    backbone = {k: v for k, v in from_path.state_dict().items() if not k.startswith("classifier.")}
    assert all(torch.equal(v, reference[k]) for k, v in backbone.items())  # only the head is new
    assert inference_model(from_path, photos[0])["pred_scores"].shape == (10,)
    assert effconv.get_model(weights, pretrained=True).num_classes == 1000  # a file by its name, as before
    with pytest.raises(UsageError, match="holds b0 weights, but b3 is b3"):
        effconv.get_model("b3", pretrained=weights)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(UsageError, match="sees no cuda device"):
        effconv.get_model("b0", pretrained=False, device="cuda")
