"""The dtypes converted weights can be written in, by name.

Names only, without torch: the CLI offers them before it imports torch.
`effconv.convert.DTYPES` maps each name to its torch dtype.
"""

from __future__ import annotations

WEIGHT_DTYPES = ("float32", "float16", "bfloat16")
