from __future__ import annotations

import pytest
import torch

from effconv.models import create_model, spec
from effconv.models.efficientnet import EfficientNet
from effconv.models.same_padding import SameConv2d, same_padding

# FACTS.md section 1, 1000 classes.
PARAMETERS = {
    "b0": 5_288_548,
    "b1": 7_794_184,
    "b2": 9_109_994,
    "b3": 12_233_232,
    "b4": 19_341_616,
    "b5": 30_389_784,
    "b6": 43_040_704,
    "b7": 66_347_960,
    "b8": 87_413_142,
    "l2": 480_309_308,
}


@pytest.mark.parametrize("arch", spec.ARCH_NAMES)
def test_parameter_counts_match_official(arch):
    with torch.device("meta"):
        model = EfficientNet(arch, 1000)
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS[arch]


def test_bn_epsilon_and_no_biases_outside_se_and_classifier():
    model = create_model("b0")
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.eps == 1e-3 for m in bns)
    biased = {n for n, _ in model.named_parameters() if n.endswith(".bias") and ".bn" not in n and "_bn" not in n}
    assert all(".se." in n or n.startswith("classifier") for n in biased)


def test_same_padding_examples():
    assert same_padding(224, 3, 2) == (0, 1)  # b0 stem
    assert same_padding(475, 3, 2) == (1, 1)  # L2-475 stem
    assert same_padding(7, 5, 1) == (2, 2)
    assert same_padding(1, 5, 2) == (2, 2)


@pytest.mark.parametrize("size", [1, 2, 7, 8, 224, 225, 97])
@pytest.mark.parametrize("kernel,stride", [(3, 2), (5, 2), (3, 1), (5, 1), (4, 2)])
def test_same_conv_output_size(size, kernel, stride):
    conv = SameConv2d(2, 2, kernel, stride)
    out = conv(torch.zeros(1, 2, size, size + 1))
    assert out.shape[-2:] == (-(-size // stride), -(-(size + 1) // stride))


def test_headless_model_and_features():
    model = create_model("b0", num_classes=0)
    assert not hasattr(model, "classifier")
    x = torch.randn(1, 3, 97, 131)
    feats = model.extract_feat(x)
    assert len(feats) == 9  # stem, 7 stages, head conv
    assert [f.shape[1] for f in feats] == [32, 16, 24, 40, 80, 112, 192, 320, 1280]
    assert feats[-1].shape[-2:] == (4, 5)
    with torch.no_grad():
        assert model(x).shape == (1, 1280)
        named = model.forward_features(x)
    assert list(named) == ["stem"] + [f"stage{i}" for i in range(1, 8)] + ["head"]


def test_endpoints_and_forward_agree():
    torch.manual_seed(0)
    model = create_model("b0", num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ends = model.forward_endpoints(x)
        assert torch.equal(ends["logits"], model(x))
    assert len([k for k in ends if k.startswith("block_")]) == 16
