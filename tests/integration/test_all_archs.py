"""Every arch b0..b8, l2: an official-format checkpoint written by TensorFlow converts completely."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from effconv.convert import convert_checkpoint
from effconv.mappings import engine, transforms
from effconv.models import spec
from tests.unit.test_efficientnet import PARAMETERS


@pytest.mark.parametrize("arch", spec.ARCH_NAMES)
def test_official_names_convert_with_nothing_missing_or_unused(arch, tmp_path):
    from effconv.models.tf_reference import official_variable_shapes
    from effconv.parity.synth import write_checkpoint

    # Names and shapes from the TF reference model (its own derivation, checked against the
    # official fixture), values random: TensorFlow writes the checkpoint.
    rng = np.random.default_rng(len(arch))
    shapes = official_variable_shapes(arch, 1000)
    weights = {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in shapes.items()}
    ckpt = tmp_path / spec.official_name(arch)
    try:
        write_checkpoint(weights, ckpt)
        result = convert_checkpoint(ckpt, variant="standard")
        assert result.skipped == {}  # zero unused
        assert result.card["mapped"] == len(shapes)  # zero missing
        assert result.card["parameters"] == PARAMETERS[arch]
        assert result.card["weights"] == "raw"
        plan = {m.target: m for m in engine.official_plan(arch, 1000, spec.official_name(arch))}
        for target, tensor in result.state_dict.items():
            if target.endswith("num_batches_tracked"):
                continue
            m = plan[target]
            assert torch.equal(tensor, torch.from_numpy(transforms.apply(m.transform, weights[m.source]))), target
    finally:
        shutil.rmtree(ckpt, ignore_errors=True)
