from __future__ import annotations

import pytest
import torch

from effconv.errors import UsageError
from effconv.models import create_model, spec
from effconv.models.efficientnet import EfficientNet
from effconv.models.same_padding import SameConv2d, same_padding
from tests.support.helpers import assert_close

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
    # The built models (tests/integration/test_families_official.py ties lite0 and edgetpu-s to the
    # official fixtures' variables); the EdgeTPU releases have 1001 classes, this is with 1000.
    "lite0": 4_652_008,
    "lite1": 5_416_680,
    "lite2": 6_092_072,
    "lite3": 8_197_096,
    "lite4": 13_006_568,
    "edgetpu-s": 5_438_392,
    "edgetpu-m": 6_899_496,
    "edgetpu-l": 10_589_712,
    # equal to timm's published counts (tf_efficientnet_cc_*, tf_efficientnetv2_*: README table)
    "condconv-b0-4e": 13_314_116,
    "condconv-b0-8e": 24_013_284,
    "condconv-b0-8e-depth": 39_715_968,
    "v2-b0": 7_139_704,
    "v2-b1": 8_141_052,
    "v2-b2": 10_096_086,
    "v2-b3": 14_358_406,
    "v2-s": 21_458_488,
    "v2-m": 54_139_356,
    "v2-l": 118_515_272,
    "v2-xl": 208_119_808,
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
        named = model.forward_stages(x)
    assert list(named) == ["stem"] + [f"stage{i}" for i in range(1, 8)] + ["head"]


def test_forward_features_is_the_final_map_as_in_timm():
    torch.manual_seed(0)
    model = create_model("b0", num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_features(x)
        assert isinstance(features, torch.Tensor) and features.shape == (2, 1280, 2, 2)
        assert torch.equal(features, model.extract_feat(x)[-1])
        assert torch.equal(model.forward_head(features), model(x))
        assert torch.equal(model.forward_head(features, pre_logits=True), features.mean((2, 3)))


def test_extract_feat_takes_out_indices_as_mmpretrain():
    torch.manual_seed(0)
    model = create_model("b0", num_classes=10)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        every = model.extract_feat(x)
        picked = model.extract_feat(x, out_indices=(6, 2, -1))  # outputs in layer order, as mmpretrain's
        assert len(picked) == 3 and all(torch.equal(a, every[i]) for a, i in zip(picked, (2, 6, 8), strict=True))
        assert [f.shape[1] for f in model.extract_feat(x, out_indices=(0,))] == [32]
        assert torch.equal(model.extract_feat(x, out_indices=7)[0], every[7])
    for bad in ((9,), (-10,), ()):
        with pytest.raises(UsageError, match="out_indices"):
            model.extract_feat(x, out_indices=bad)


def test_reset_classifier():
    torch.manual_seed(0)
    model = create_model("b0", num_classes=1000)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_features(x)
        assert model.reset_classifier(10) is model and model.num_classes == 10
        assert model.classifier.weight.shape == (10, 1280) and model(x).shape == (1, 10)
        assert torch.equal(model.forward_features(x), features)  # the backbone is untouched
        model.reset_classifier(0)
        assert not hasattr(model, "classifier") and model(x).shape == (1, 1280)
        model.double().reset_classifier(3)
        assert model.classifier.weight.dtype == torch.float64 and model(x.double()).shape == (1, 3)
    assert "classifier.weight" in model.state_dict()


def test_endpoints_and_forward_agree():
    torch.manual_seed(0)
    model = create_model("b0", num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ends = model.forward_endpoints(x)
        assert torch.equal(ends["logits"], model(x))
    assert len([k for k in ends if k.startswith("block_")]) == 16


def _randomised(model: EfficientNet, seed: int = 0) -> EfficientNet:
    """Random weights and BN statistics far from identity, so every layer matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            r = torch.randn(t.shape, generator=gen)
            t.copy_(r.abs() * 0.5 + 0.5 if name.endswith("running_var") else r * 0.1)
    return model.eval()


@pytest.mark.parametrize("size", [1, 2, 7, 8, 31, 32, 97, 224, 225])
def test_static_input_size_equals_dynamic_padding(size):
    dynamic = _randomised(create_model("b0", num_classes=10))
    static = _randomised(create_model("b0", num_classes=10, input_size=size))
    assert static.input_size == (size, size)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        assert torch.equal(static(x), dynamic(x))


def test_static_model_still_exact_at_other_sizes():
    dynamic = _randomised(create_model("b0", num_classes=10))
    static = _randomised(create_model("b0", num_classes=10)).set_input_size(224)
    with torch.no_grad():
        for h, w in [(225, 225), (97, 131), (224, 223), (64, 64)]:
            x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(h * w))
            assert torch.equal(static(x), dynamic(x)), (h, w)
    assert static.set_input_size(None).input_size is None
    assert all(c.static_size is None for c in static.same_convs())


def test_static_plans_follow_the_feature_map_sizes():
    model = create_model("b0", input_size=224)
    strided = [c for c in model.same_convs() if c.stride[0] == 2]
    # b0 at 224: the stride-2 convs see 224, 112, 56, 28, 14; even sizes pad asymmetrically (extra pixel after).
    assert [c.static_size for c in strided] == [(224, 224), (112, 112), (56, 56), (28, 28), (14, 14)]
    assert all(c.padding_plan(*c.static_size)[0] is not None for c in strided)
    odd = create_model("b0", input_size=225)
    assert [c.static_size[0] for c in odd.same_convs() if c.stride[0] == 2] == [225, 113, 57, 29, 15]


@pytest.mark.parametrize("kernel,stride", [(3, 2), (5, 2), (4, 2), (3, 1), (4, 1)])
def test_folded_symmetric_padding_equals_explicit_pad(kernel, stride):
    conv = SameConv2d(4, 6, kernel, stride, bias=True)
    for size in range(1, 14):
        x = torch.randn(1, 4, size, size + 1)
        pads, padding = conv.padding_plan(size, size + 1)
        if pads is None:  # symmetric: the convolution pads by itself, no F.pad copy
            assert padding == (conv.pads_for(size, size + 1)[2], conv.pads_for(size, size + 1)[0])
        expected = torch.nn.functional.conv2d(
            torch.nn.functional.pad(x, conv.pads_for(size, size + 1)),
            conv.weight,
            conv.bias,
            conv.stride,
            0,
            conv.dilation,
            conv.groups,
        )
        with torch.no_grad():
            assert_close(conv(x), expected, what=f"size {size}")


def test_static_and_channels_last_match_the_official_fixture(fixture_ckpt, oracle):
    from effconv.convert import convert_checkpoint
    from tests.support.helpers import nchw

    model = create_model("b0")
    model.load_state_dict(convert_checkpoint(fixture_ckpt, variant="standard").state_dict)
    x = nchw(oracle["x"])
    model.set_input_size(x.shape[-1])
    with torch.no_grad():
        assert_close(model(x), oracle["logits_ema"], what="static")
        model.to(memory_format=torch.channels_last)
        assert_close(model(x.contiguous(memory_format=torch.channels_last)), oracle["logits_ema"], what="channels-last")


def test_training_step_runs_with_inplace_activations():
    model = create_model("b0", num_classes=3).train()
    x = torch.randn(2, 3, 33, 33)
    model(x).sum().backward()
    assert model.stem.conv.weight.grad is not None and torch.isfinite(model.stem.conv.weight.grad).all()


@pytest.mark.parametrize("size", [224, 225, 97])
def test_channels_last_by_default_and_equal_to_the_nchw_model(size):
    fast = create_model("b0", num_classes=10)
    assert fast.stem.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not fast.stem.conv.weight.is_contiguous()
    plain = create_model("b0", num_classes=10, channels_last=False)
    assert plain.stem.conv.weight.is_contiguous()
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        a, b = fast(x), plain(x)
        feats_fast, feats_plain = fast.extract_feat(x), plain.extract_feat(x)
    # Random weights shrink the activations to ~1e-12 by the last stage: relative limits only (atol=0).
    assert a.shape == b.shape == (2, 10)
    assert_close(a, b, atol=0, what="logits")
    assert feats_fast[1].is_contiguous(memory_format=torch.channels_last)  # NCHW shapes, NHWC strides
    for i, (f, g) in enumerate(zip(feats_fast, feats_plain, strict=True)):
        assert_close(f, g, atol=0, what=f"feature {i}")
