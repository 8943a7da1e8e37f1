from __future__ import annotations

import pytest

from effconv.ema_policy import choose_weights
from effconv.errors import MappingError, UsageError

NEEDED = ["a", "b", "c"]
EMA = "/ExponentialMovingAverage"


def test_auto_prefers_ema_when_complete():
    choice = choose_weights(NEEDED, {"a", "b", "c", "a" + EMA, "b" + EMA, "c" + EMA})
    assert choice.used == "ema" and choice.source_of["b"] == "b" + EMA


def test_auto_takes_raw_without_any_ema():
    choice = choose_weights(NEEDED, {"a", "b", "c"})
    assert choice.used == "raw" and choice.source_of == {"a": "a", "b": "b", "c": "c"}


def test_ema_only_checkpoint():
    available = {"a" + EMA, "b" + EMA, "c" + EMA}
    assert choose_weights(NEEDED, available).used == "ema"
    with pytest.raises(MappingError, match="only EMA copies"):
        choose_weights(NEEDED, available, "raw")


def test_partial_ema_is_an_error_unless_allowed():
    available = {"a", "b", "c", "a" + EMA}
    with pytest.raises(MappingError, match="only 1 of 3 model variables have an EMA copy"):
        choose_weights(NEEDED, available)
    mixed = choose_weights(NEEDED, available, allow_mixed=True)
    assert mixed.used == "mixed" and mixed.mixed == ("b", "c") and mixed.source_of["a"] == "a" + EMA
    assert choose_weights(NEEDED, available, "raw").used == "raw"


def test_forced_ema_without_any():
    with pytest.raises(MappingError, match="only 0 of 3"):
        choose_weights(NEEDED, {"a", "b", "c"}, "ema")


def test_unknown_policy():
    with pytest.raises(UsageError):
        choose_weights(NEEDED, set(), "best")
