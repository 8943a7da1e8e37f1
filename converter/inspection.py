"""`effconv inspect`: what a source holds, without reading its tensors (beyond a few scalars)."""

from __future__ import annotations

import os
from collections import Counter

from effconv.errors import EffconvError
from effconv.formats import get_format, open_source


def inspect_checkpoint(src: str | os.PathLike) -> dict:
    """A JSON-ready description of the source at `src` (any format the registry reads)."""
    with open_source(src) as source:
        keys = source.reader.keys()
        infos = {k: source.reader.info(k) for k in keys}
        report: dict = {
            "source": str(source.origin),
            "format": source.format.name,
            "files": {p.name: p.stat().st_size for p in source.files},
            "variables": len(keys),
            "bytes": sum(i.nbytes for i in infos.values()),
            "dtypes": dict(Counter(str(i.dtype) for i in infos.values())),
        }
        try:
            report.update(source.format.inspect(source, infos))
        except EffconvError as e:
            report.update(arch=None, problem=str(e))
    return report


def format_report(report: dict) -> str:
    """The human-readable form of `inspect_checkpoint`'s result."""
    mib = report["bytes"] / 2**20
    lines = [
        f"source:      {report['source']}",
        f"variables:   {report['variables']} ({mib:,.1f} MiB of tensor data; dtypes {report['dtypes']})",
    ]
    described = get_format(report["format"]).describe(report)
    if report.get("arch") is None:
        lines += [line for line in described if line.startswith("format:")]
        lines.append(f"arch:        not recognised: {report.get('problem')}")
        return "\n".join(lines)
    lines += described
    lines.append(
        f"unknown:     {len(report['unknown_variables'])}"
        + (f" e.g. {report['unknown_variables'][:3]}" if report["unknown_variables"] else "")
    )
    if report["missing"]:
        lines.append(f"MISSING:     {len(report['missing'])} model variables, e.g. {report['missing'][:3]}")
    return "\n".join(lines)
