"""The redesign into families, block kinds and source formats changed no byte of any conversion.

`tests/data/conversion_digests.json` was recorded by `python -m tests.support.digests` on the code
before the redesign; every arch and layout must still give the same names, shapes, dtypes and bytes.
"""

from __future__ import annotations

import json

import pytest

from effconv.models.tf_reference import official_variable_shapes
from tests.support import digests

RECORDED = json.loads(digests.RECORD.read_text())


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "ema", "dtype"), digests.CASES, ids=[digests.case_id(*c) for c in digests.CASES])
def test_conversions_are_byte_identical_to_the_recorded_ones(arch, ema, dtype, tmp_path):
    shapes = official_variable_shapes(arch, 1000)
    assert digests.case_digests(arch, ema, dtype, shapes, tmp_path) == RECORDED[digests.case_id(arch, ema, dtype)]


def test_every_arch_has_a_recorded_digest():
    from effconv.models import spec

    # the B family's archs, recorded before the Lite and EdgeTPU families came
    assert {a for a, _, _ in digests.CASES} == {a for a in spec.ARCH_NAMES if spec.get_arch(a).family == "efficientnet"}
    assert set(RECORDED) == {digests.case_id(*c) for c in digests.CASES}
