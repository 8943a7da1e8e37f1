"""Parity reports: JSON for machines, Markdown for people, JUnit XML for CI, PNG per-layer plots."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from pathlib import Path

from effconv.errors import OutputError, UsageError

REPORT_SUFFIXES = (".json", ".md", ".xml", ".png")


def check_report_paths(paths: Sequence[str | os.PathLike]) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if p.suffix not in REPORT_SUFFIXES:
            raise UsageError(f"--report {p}: the suffix must be one of {', '.join(REPORT_SUFFIXES)}")
        if not p.parent.is_dir():
            raise UsageError(f"--report {p}: directory does not exist")
        out.append(p)
    return out


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def to_markdown(reports: Sequence[dict], title: str = "effconv parity report") -> str:
    lines = [f"# {title}", ""]
    if reports:
        v = reports[0]["versions"]
        lines += [
            f"effconv {v['effconv']}, torch {v['torch']}, TensorFlow {v['tensorflow']}, numpy {v['numpy']}, "
            f"Python {v['python']}. {reports[0]['tolerance']}.",
            "",
        ]
    lines += [
        "| model | input | weights | max abs diff | max rel diff | cosine (min) | top-1 | top-5 "
        "| first divergent layer | result |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rep in reports:
        for c in rep["cases"]:
            lg = c["logits"] or {}
            extra = f" (preprocessing {c['preprocessing_max_abs']:.2g})" if c.get("preprocessing_max_abs") else ""
            lines.append(
                f"| {c['name']} | {c['input']}{extra} | {rep['weights']} | {_fmt(lg.get('max_abs'))} | "
                f"{_fmt(lg.get('max_rel'))} | {_fmt(c['cosine_min'])} | {_fmt(c['top1_agreement'])} | "
                f"{_fmt(c['top5_agreement'])} | {c['first_divergent'] or '-'} | "
                f"{'PASS' if c['passed'] else '**FAIL**'} |"
            )
    notes = [n for rep in reports for n in rep.get("notes", [])]
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    total = sum(len(r["cases"]) for r in reports)
    failed = sum(not c["passed"] for r in reports for c in r["cases"])
    lines += ["", f"**{total - failed} passed, {failed} failed**", ""]
    return "\n".join(lines)


def to_junit(reports: Sequence[dict], suite: str = "effconv-parity") -> str:
    cases = [(rep, c) for rep in reports for c in rep["cases"]]
    failures = sum(not c["passed"] for _, c in cases)
    seconds = sum(c["seconds_tf"] + c["seconds_torch"] for _, c in cases)
    root = ET.Element("testsuites", name=suite, tests=str(len(cases)), failures=str(failures))
    ts = ET.SubElement(
        root, "testsuite", name=suite, tests=str(len(cases)), failures=str(failures), errors="0", time=f"{seconds:.3f}"
    )
    for rep, c in cases:
        tc = ET.SubElement(
            ts,
            "testcase",
            classname=f"parity.{rep['arch']}",
            name=f"{c['name']} [{c['input']}]",
            time=f"{c['seconds_tf'] + c['seconds_torch']:.3f}",
        )
        lg = c["logits"] or {}
        summary = f"max abs diff {_fmt(lg.get('max_abs'))} (tolerance {_fmt(lg.get('tolerance'))})"
        if not c["passed"]:
            f = ET.SubElement(tc, "failure", message=f"{summary}; first divergent layer {c['first_divergent']}")
            f.text = json.dumps(c["layers"], indent=1)
        else:
            ET.SubElement(tc, "system-out").text = summary
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def to_png(reports: Sequence[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for rep in reports for c in rep["cases"]]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    longest = max((len(c["layers"]) for c in cases), default=0)
    plotted = False
    for c in cases:
        layers = c["layers"] or ([c["logits"]] if c["logits"] else [])
        diffs = [max(layer["max_abs"], 1e-12) for layer in layers]
        ax.plot(range(len(diffs)), diffs, marker=".", label=c["name"])
        plotted = True
    atol = reports[0]["atol"] if reports else 0
    if atol:
        ax.axhline(atol, color="red", linestyle="--", label=f"atol {atol:g}")
    if longest:
        names = [layer["name"] for layer in max((c["layers"] for c in cases), key=len)]
        step = max(1, len(names) // 24)
        ax.set_xticks(range(0, len(names), step), names[::step], rotation=60, fontsize=7, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("max |torch - tf|")
    ax.set_title("per-layer difference (logits only where no per-layer run)")
    if plotted:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


WRITERS: dict[str, Callable[[Sequence[dict], Path], None]] = {
    ".json": lambda reps, p: p.write_text(json.dumps(reps[0] if len(reps) == 1 else reps, indent=2) + "\n"),
    ".md": lambda reps, p: p.write_text(to_markdown(reps)),
    ".xml": lambda reps, p: p.write_text(to_junit(reps)),
    ".png": lambda reps, p: to_png(reps, p),
}


def write_reports(reports: Sequence[dict], paths: Sequence[Path]) -> None:
    for p in paths:
        try:
            WRITERS[p.suffix](reports, p)
        except OSError as e:
            raise OutputError(f"cannot write report {p}: {e.strerror or e}") from e
