"""effconv's own layout: the canonical module names every other layout table renames from."""

from __future__ import annotations

from effconv.mappings.tables import LayoutTable

_BLOCK_MODULES = ("dw_conv", "dw_bn", "se.reduce", "se.expand", "project_conv", "project_bn")

TABLE = LayoutTable(
    name="native",
    stem=(("stem.conv", "stem.conv"), ("stem.bn", "stem.bn")),
    blocks={
        "mbconv": tuple((m, m) for m in ("expand_conv", "expand_bn", *_BLOCK_MODULES)),
        "mbconv:no_expand": tuple((m, m) for m in _BLOCK_MODULES),
        "edge_residual": tuple((m, m) for m in ("expand_conv", "expand_bn", "project_conv", "project_bn")),
        "fused_mbconv": tuple((m, m) for m in ("expand_conv", "expand_bn", "project_conv", "project_bn")),
        "fused_mbconv:no_expand": tuple((m, m) for m in ("project_conv", "project_bn")),
        "condconv_mbconv": tuple((m, m) for m in ("routing", "expand_conv", "expand_bn", *_BLOCK_MODULES)),
    },
    head=(("head.conv", "head.conv"), ("head.bn", "head.bn")),
    classifier=(("classifier", "classifier"),),
    block_scope="blocks.{index}.",
    library="effconv (effconv.models.load)",
)
