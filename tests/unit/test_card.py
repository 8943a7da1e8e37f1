"""The model card type: cards effconv 0.1 wrote load and write back unchanged; bad fields are named."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from effconv.card import ModelCard, Preprocessing
from effconv.errors import UsageError

DATA = Path(__file__).resolve().parents[1] / "data"
# Written by `effconv convert` 0.1.0 from the official-b0 fixture (native .pth, timm .safetensors), `skipped` trimmed.
CARD_FILES = ["card-b0-0.1.0.json", "card-b0-timm-0.1.0.json"]
WHERE = "the model card /tmp/b0.json"


def _card(name: str = CARD_FILES[0]) -> dict:
    return json.loads((DATA / name).read_text())


@pytest.mark.parametrize("name", CARD_FILES)
def test_cards_of_effconv_0_1_round_trip_byte_for_byte(name):
    text = (DATA / name).read_text()
    card = ModelCard.from_json(json.loads(text), where=WHERE)
    assert json.dumps(card.to_json(), indent=2) + "\n" == text  # same keys, same order, same values
    assert ModelCard.from_json(card.to_json()) == card


def test_fields_of_a_native_card():
    card = ModelCard.from_json(_card())
    assert (card.arch, card.num_classes, card.image_size, card.layout) == ("b0", 1000, 224, "native")
    assert card.preprocessing == Preprocessing(
        image_size=224,
        crop="center",
        crop_padding=32,
        crop_fraction=0.875,
        interpolation="bicubic-tf1-legacy",
        input_range="RGB 0-255, float, not clipped",
        mean=(123.675, 116.28, 103.53),
        std=(58.395, 57.12, 57.375),
        channel_order="RGB",
        layout="NCHW",
    )
    assert card.weights == "ema" and card.mixed_variables == () and card.parameters == 5288548
    assert card.source_sha256 == _card()["source"]["sha256"] and card.skipped["global_step"] == "training counter"
    assert card.layout_section is None and card.file_format == "torch" and card.extra == {}


def test_a_timm_card_keeps_its_layout_section():
    card = ModelCard.from_json(_card(CARD_FILES[1]))
    assert card.layout == "timm" and card.layout_section["model_name"] == "tf_efficientnet_b0"
    assert "timm" not in card.extra and card.to_json()["timm"] == _card(CARD_FILES[1])["timm"]


def test_the_card_reads_like_its_json():
    """`model.card["preprocessing"]` (README) and other dict reads keep working on the type."""
    obj = _card()
    card = ModelCard.from_json(obj)
    assert card == obj and dict(card) == obj and list(card) == list(obj) and len(card) == len(obj)
    assert card["preprocessing"] == obj["preprocessing"] and card.get("timm") is None and "skipped" in card
    card["preprocessing"]["mean"].append(0.0)  # a copy: the card itself cannot change
    assert card.preprocessing.mean == (123.675, 116.28, 103.53) and card["preprocessing"] == obj["preprocessing"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        card.arch = "b7"


def test_a_card_from_a_keras_source_or_the_catalogue_and_unknown_keys_round_trip():
    obj = _card()
    obj["preprocessing"]["normalization"] = "the Keras graph's"
    obj["input_normalization"] = {"folded_into": "preprocessing.mean/std", "graph": "g", "steps": ["Rescaling"]}
    obj["preprocessing"]["resize_note"] = "kept"
    del obj["file_format"]
    obj |= {"catalogue_name": "efficientnet-b0_3rdparty_8xb32_in1k", "file_format": "torch", "future_field": [1]}
    card = ModelCard.from_json(obj)
    assert card.preprocessing.normalization == "the Keras graph's" and card.input_normalization["steps"]
    assert card.catalogue_name == "efficientnet-b0_3rdparty_8xb32_in1k" and card.extra == {"future_field": [1]}
    assert card.preprocessing.extra == {"resize_note": "kept"}
    assert json.dumps(card.to_json()) == json.dumps(obj)


def test_a_sparse_hand_written_card_loads_and_keeps_its_few_keys():
    """Like the readers before the type: only arch and num_classes are needed (verify: no image_size, source)."""
    obj = {"arch": "b3", "num_classes": 0, "layout": "native"}
    card = ModelCard.from_json(obj)
    assert card.to_json() == obj and card.image_size is None and card.source_sha256 is None
    assert card.input_size() == 300  # the arch's native size stands in for a missing image_size
    assert card.weights is None and card.preprocessing is None
    assert ModelCard.from_json({"arch": "b0", "num_classes": 1}).layout == "native"


def test_crop_padding_missing_is_the_official_one_and_null_the_newer_rule():
    pre = {"image_size": 224, "mean": [0, 0, 0], "std": [1, 1, 1]}
    assert Preprocessing.from_json(pre).crop_padding == 32
    newer = Preprocessing.from_json(pre | {"crop_padding": None})
    assert newer.crop_padding is None and newer.to_json()["crop_padding"] is None
    assert Preprocessing.from_json(pre).to_json()["mean"] == [0, 0, 0]  # integers stay integers


def test_a_card_without_preprocessing_is_refused_where_it_is_needed():
    obj = {k: v for k, v in _card().items() if k != "preprocessing"}
    card = ModelCard.from_json(obj, where=WHERE)  # loading needs arch and classes only
    with pytest.raises(UsageError, match=rf"^{WHERE} has no 'preprocessing' section: --images needs it$"):
        card.needs_preprocessing("--images needs it")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"arch": None}, "has no valid 'arch' (got None); expected one of b0, "),
        ({"arch": 7}, "has no valid 'arch' (got 7)"),
        ({"arch": "b99"}, ": unknown architecture 'b99'"),
        ({"num_classes": None}, "has no valid 'num_classes' (got None); expected an integer >= 0"),
        ({"num_classes": -1}, "has no valid 'num_classes' (got -1)"),
        ({"num_classes": True}, "has no valid 'num_classes' (got True)"),
        ({"num_classes": "1000"}, "has no valid 'num_classes' (got '1000')"),
        ({"image_size": "224"}, "has no valid 'image_size' (got '224'); expected an integer > 0"),
        ({"image_size": 0}, "has no valid 'image_size' (got 0)"),
        ({"layout": 5}, "has no valid 'layout' (got 5); expected a string"),
        ({"preprocessing": "imagenet"}, "has no valid 'preprocessing' (got 'imagenet'); expected a JSON object"),
        ({"preprocessing": {"mean": [0] * 3, "std": [1] * 3}}, "has no valid 'preprocessing.image_size' (got None)"),
        ({"preprocessing": {"image_size": 224, "std": [1] * 3}}, "has no valid 'preprocessing.mean' (got None)"),
        ({"preprocessing": {"image_size": 9, "mean": [0, 0], "std": [1] * 3}}, "'preprocessing.mean' (got [0, 0])"),
        (
            {"preprocessing": {"image_size": 9, "mean": [0] * 3, "std": [1, 0, 1]}},
            "'preprocessing.std' (got [1, 0, 1])",
        ),
        ({"preprocessing": {"image_size": 9, "mean": ["0"] * 3, "std": [1] * 3}}, "'preprocessing.mean' (got ['0'"),
        ({"preprocessing": {"image_size": 9, "mean": [0] * 3, "std": [1] * 3, "crop_padding": -1}}, "crop_padding'"),
        ({"source": ["x"]}, "has no valid 'source' (got ['x']); expected a JSON object"),
        ({"skipped": "none"}, "has no valid 'skipped' (got 'none')"),
        ({"nonfinite": {"w": -1}}, "has no valid 'nonfinite' (got {'w': -1}); expected names -> counts"),
        ({"mixed_variables": [1]}, "has no valid 'mixed_variables' (got [1]); expected a list of strings"),
        ({"bn_eps": "0.001"}, "has no valid 'bn_eps' (got '0.001'); expected a number"),
        ({"parameters": 1.5}, "has no valid 'parameters' (got 1.5)"),
        ({"weights": 1}, "has no valid 'weights' (got 1)"),
        ({"layout": "timm", "timm": "tf_efficientnet_b0"}, "has no valid 'timm' (got 'tf_efficientnet_b0')"),
    ],
)
def test_each_bad_field_is_named_in_one_line(edit, message):
    obj = {k: v for k, v in (_card() | edit).items() if v is not None}
    with pytest.raises(UsageError) as e:
        ModelCard.from_json(obj, where=WHERE)
    assert str(e.value).startswith(WHERE) and message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_long_bad_value_is_shortened():
    with pytest.raises(UsageError) as e:
        ModelCard.from_json(_card() | {"skipped": ["x" * 1000]}, where=WHERE)
    assert len(str(e.value)) < 200 and "..." in str(e.value)


def test_not_an_object():
    with pytest.raises(UsageError, match=rf"^{WHERE} is not a JSON object$"):
        ModelCard.from_json([1, 2], where=WHERE)


@pytest.mark.parametrize("layout", ["native", "timm", "mmpretrain"])
def test_the_dict_a_conversion_builds_is_a_card(fixture_ckpt, layout):
    """What convert.py builds today becomes the type with `ModelCard.from_json(card)`, unchanged."""
    from effconv.convert import convert_checkpoint

    built = convert_checkpoint(fixture_ckpt, variant="standard", layout=layout).card
    card = ModelCard.from_json(built)
    assert json.dumps(card.to_json()) == json.dumps(dict(built))
    assert card.layout == layout and (card.layout_section is None) == (layout == "native")
    assert ModelCard.from_json(card) == card  # a card is a mapping of its JSON: it reads as one


def test_the_nonfinite_record_is_a_field_and_round_trips():
    """convert --allow-nonfinite records the tensors holding NaN or Inf it kept, and how many values each."""
    card = ModelCard.from_json(_card() | {"nonfinite": {"a/kernel": 3}}, where=WHERE)
    assert card.nonfinite == {"a/kernel": 3} and "nonfinite" not in card.extra
    assert card.to_json()["nonfinite"] == {"a/kernel": 3}
    assert ModelCard.from_json(_card(), where=WHERE).nonfinite is None
