"""The registry of model families: adding a family is one module here and one row below."""

from __future__ import annotations

from effconv.models.families import condconv, edgetpu, efficientnet, lite, v2
from effconv.models.family import Family

FAMILIES: dict[str, Family] = {
    f.name: f for f in (efficientnet.FAMILY, lite.FAMILY, edgetpu.FAMILY, condconv.FAMILY, v2.FAMILY)
}
