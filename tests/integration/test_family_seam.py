"""The family / block-kind seam carries what the B family does not use, through every consumer of the table."""

from __future__ import annotations

import numpy as np
import torch

from effconv.mappings import engine, transforms
from effconv.models import spec
from effconv.models.same_padding import SameConv2d, SymmetricConv2d
from tests.support.families import TOY, registered
from tests.support.helpers import assert_close


def test_family_fields_shape_the_blocks():
    with registered():
        t1 = spec.blocks("t1")
        assert spec.family_of("toynet-t1") is TOY and spec.get_arch("toynet-t1").family == "toynet"
        assert (spec.stem_channels("t1"), spec.head_channels("t1")) == (24, 96)  # fixed while scaling
        assert all(b.activation == "relu6" and not b.has_se and b.padding == "symmetric" for b in t1)
        # depth 1.6 scales the middle stage only (4 blocks): the first and last keep their repeats
        assert [b.out_channels for b in t1] == [24, 32, 32, 32, 32, 56, 56]
        assert (t1[0].in_channels, t1[0].mid_channels) == (24, 24)  # the fixed stem's width, not round(32 * 1.3)
        assert (t1[1].in_channels, t1[1].mid_channels) == (24, 144)  # expand 6 of the nominal input
        assert (
            TOY.round_channels(11, 1.0) == 8 and spec.FAMILIES["efficientnet"].round_channels(11, 1.0) == 16
        )  # +8 rule
        assert spec.archs_of_shape(7, 24, 96) == ["t1"]
    assert "t1" not in spec.ARCHS  # the registry is restored


def test_pytorch_model_follows_the_family():
    from effconv.models.efficientnet import create_model

    with registered():
        model = create_model("t0", num_classes=5)
        acts = {type(m) for m in model.modules() if isinstance(m, torch.nn.ReLU6 | torch.nn.SiLU)}
        assert acts == {torch.nn.ReLU6}
        assert not any(".se." in name for name, _ in model.named_parameters())
        assert all(isinstance(c, SymmetricConv2d) and not isinstance(c, SameConv2d) for c in model.same_convs())
        model.set_input_size(65)  # odd size: symmetric padding gives floor sizes
        assert model(torch.zeros(1, 3, 65, 65)).shape == (1, 5)


def test_tf_reference_and_pytorch_agree_on_the_new_family():
    from effconv.models.efficientnet import create_model
    from effconv.models.tf_reference import TFReferenceModel, official_variable_shapes

    torch.manual_seed(0)
    with registered():
        model = create_model("t1", num_classes=7, channels_last=False)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial statistics
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
        state = model.state_dict()
        plan = engine.official_plan("t1", 7, "toynet-t1")
        assert not any("/se/" in m.source for m in plan)  # the SE rows need the part the blocks lack
        weights = {m.source: transforms.source_shape(m.transform, state[m.target].shape) for m in plan}
        assert weights == official_variable_shapes("t1", 7)
        for m in plan:  # official-layout arrays of the model's own tensors
            perm = transforms.PERMUTATIONS[m.transform]
            value = state[m.target].numpy()
            weights[m.source] = value if perm is None else value.transpose(np.argsort(perm))
        tf_model = TFReferenceModel("t1", weights, prefix="toynet-t1")
        x = np.random.default_rng(0).standard_normal((2, 71, 71, 3), dtype=np.float32)
        ours = model(torch.from_numpy(x.transpose(0, 3, 1, 2))).detach().numpy()
        ref = tf_model(x)
        assert_close(ours, ref)  # float32 through two frameworks: tolerance relative to max|ref|
        assert np.abs(ref).max() > 1e-3
