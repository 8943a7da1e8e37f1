"""Which copy of each variable to use: the EMA shadow or the raw value."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from effconv.errors import MappingError, UsageError
from effconv.mappings.official import EMA_SUFFIX

POLICIES = ("auto", "ema", "raw")


@dataclass(frozen=True)
class EmaChoice:
    used: str  # "ema", "raw" or "mixed"
    source_of: dict[str, str]  # base name -> the checkpoint key to read
    ema_count: int
    raw_count: int
    mixed: tuple[str, ...] = field(default=())  # base names read raw although EMA was asked for


def choose_weights(
    needed: Sequence[str], available: Collection[str], policy: str = "auto", allow_mixed: bool = False
) -> EmaChoice:
    """EMA when every needed variable has it, raw otherwise; a partial mixture is an error unless allowed.

    `needed` are base (non-EMA) names; `available` the checkpoint's keys.
    """
    if policy not in POLICIES:
        raise UsageError(f"--ema must be one of {', '.join(POLICIES)}, not {policy!r}")
    has_ema = [n for n in needed if n + EMA_SUFFIX in available]
    has_raw = [n for n in needed if n in available]
    total = len(needed)
    if policy == "auto":
        policy = "ema" if has_ema else "raw"
    if policy == "raw":
        if len(has_raw) < total and not allow_mixed:
            missing = [n for n in needed if n not in available]
            hint = " (the checkpoint holds only EMA copies: use --ema ema)" if not has_raw else ""
            raise MappingError(f"--ema raw: {len(missing)} of {total} variables have no raw copy{hint}")
        source = {n: n if n in available else n + EMA_SUFFIX for n in needed}
        fallback = tuple(n for n in needed if n not in available)
        return EmaChoice("mixed" if fallback else "raw", source, len(has_ema), len(has_raw), fallback)
    if len(has_ema) < total:
        lacking = [n for n in needed if n + EMA_SUFFIX not in available]
        if not allow_mixed:
            raise MappingError(
                f"only {len(has_ema)} of {total} model variables have an EMA copy "
                f"(e.g. {lacking[0]} has none): use --ema raw, or --allow-mixed to take the "
                "EMA copy where present and the raw one elsewhere"
            )
        source = {n: n + EMA_SUFFIX if n + EMA_SUFFIX in available else n for n in needed}
        return EmaChoice("mixed", source, len(has_ema), len(has_raw), tuple(lacking))
    return EmaChoice("ema", {n: n + EMA_SUFFIX for n in needed}, len(has_ema), len(has_raw))
