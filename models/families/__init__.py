"""The registry of model families: adding a family is one module here and one row below."""

from __future__ import annotations

from effconv.models.families import edgetpu, efficientnet, lite
from effconv.models.family import Family

FAMILIES: dict[str, Family] = {f.name: f for f in (efficientnet.FAMILY, lite.FAMILY, edgetpu.FAMILY)}
