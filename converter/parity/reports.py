"""Parity reports: JSON for machines, Markdown for people, JUnit XML for CI, PNG per-layer plots."""

from __future__ import annotations

import json
import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from pathlib import Path

from effconv.errors import OutputError, UsageError

REPORT_SUFFIXES = (".json", ".md", ".xml", ".png")


def check_report_paths(paths: Sequence[str | os.PathLike], keep: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """The report paths, checked; none may be one of `keep` (the weights and their model card beside them)."""
    kept = {Path(k).resolve() for k in keep}
    out = []
    for p in map(Path, paths):
        if p.suffix not in REPORT_SUFFIXES:
            raise UsageError(f"--report {p}: the suffix must be one of {', '.join(REPORT_SUFFIXES)}")
        if not p.parent.is_dir():
            raise UsageError(f"--report {p}: directory does not exist")
        if p.resolve() in kept:
            raise UsageError(f"--report {p} would overwrite the weights or their model card; name the report otherwise")
        out.append(p)
    return out


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _cell(v) -> str:
    """A JSON value in one Markdown table cell."""
    text = _fmt(v) if v is None or isinstance(v, str | int | float) else json.dumps(v)
    return text.replace("|", "\\|").replace("\n", " ")


# The report's own keys, each rendered in its place; any other key (a newer effconv's) goes in the header table.
_REPORT_KEYS = {"arch", "num_classes", "weights", "source", "source_sha256", "artifact", "atol", "rtol", "cases"}
_REPORT_KEYS |= {"versions", "notes", "passed", "tolerance"}
_CASE_KEYS = {"name", "input", "batch", "input_size", "logits", "cosine_min", "top1_agreement", "top5_agreement"}
_CASE_KEYS |= {"layers", "first_divergent", "preprocessing_max_abs", "seconds_tf", "seconds_torch", "passed"}


def _verdict(passed: bool) -> str:
    return "PASS" if passed else "**FAIL**"


def _header(rep: dict) -> list[str]:
    v = rep["versions"]
    hashes = ", ".join(f"{name} {digest}" for name, digest in (rep.get("source_sha256") or {}).items())
    rows = [
        ("model", f"efficientnet-{rep['arch']}, {rep['num_classes']} classes"),
        ("weights checked", f"{rep.get('artifact') or 'in-memory conversion'} ({rep['weights']} copy)"),
        ("source", rep["source"]),
        ("source sha256", hashes or "-"),
        ("tolerance", rep.get("tolerance") or f"atol {rep['atol']:g}, rtol {rep['rtol']:g}"),
        ("versions", ", ".join(f"{k} {val}" for k, val in v.items())),
        *((k, val) for k, val in rep.items() if k not in _REPORT_KEYS),
    ]
    verdict = _verdict(rep.get("passed", all(c["passed"] for c in rep["cases"])))
    return [f"## {verdict}: efficientnet-{rep['arch']}", "", "| | |", "|---|---|"] + [
        f"| {k} | {_cell(x)} |" for k, x in rows
    ]


def _cases_table(rep: dict) -> list[str]:
    lines = [
        "| case | input | batch | size | max abs diff | limit | max rel diff | cosine (min) | top-1 | top-5 "
        "| first divergent layer | seconds TF / torch | result |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in rep["cases"]:
        lg = c["logits"] or {}
        size = "x".join(map(str, c["input_size"]))
        lines.append(
            f"| {c['name']} | {c['input']} | {c['batch']} | {size} | {_fmt(lg.get('max_abs'))} | "
            f"{_fmt(lg.get('tolerance'))} | {_fmt(lg.get('max_rel'))} | {_fmt(c['cosine_min'])} | "
            f"{_fmt(c['top1_agreement'])} | {_fmt(c['top5_agreement'])} | {c['first_divergent'] or '-'} | "
            f"{c['seconds_tf']:.2f} / {c['seconds_torch']:.2f} | {_verdict(c['passed'])} |"
        )
    extra = [(c["name"], k, v) for c in rep["cases"] for k, v in c.items() if k not in _CASE_KEYS]
    if extra:
        lines += [
            "",
            "| case | field | value |",
            "|---|---|---|",
            *(f"| {n} | {k} | {_cell(v)} |" for n, k, v in extra),
        ]
    return lines


def _layer_table(case: dict) -> list[str]:
    lines = [
        f"### Per layer: {case['name']}",
        "",
        "| layer | shape | max abs diff | limit | max rel diff | max abs TF | result |",
        "|---|---|---|---|---|---|---|",
    ]
    for layer in case["layers"]:
        result = _verdict(layer["passed"])
        if layer["name"] == case["first_divergent"]:
            result += " (first divergent layer)"
        lines.append(
            f"| {layer['name']} | {'x'.join(map(str, layer['shape']))} | {_fmt(layer['max_abs'])} | "
            f"{_fmt(layer['tolerance'])} | {_fmt(layer['max_rel'])} | {_fmt(layer['ref_absmax'])} | {result} |"
        )
    return lines


def _preprocessing_table(rep: dict) -> list[str]:
    images = [c for c in rep["cases"] if c.get("preprocessing_max_abs") is not None]
    if not images:
        return []
    return [
        "### Preprocessing: effconv's (numpy) against TensorFlow's own ops",
        "",
        "Both models are given TensorFlow's preprocessing; this is how far effconv's differs (0-255 pixel scale).",
        "",
        "| case | max abs diff of preprocessed pixels |",
        "|---|---|",
        *(f"| {c['name']} | {_fmt(c['preprocessing_max_abs'])} |" for c in images),
    ]


def to_markdown(reports: Sequence[dict], title: str = "effconv parity report") -> str:
    """Everything the JSON report holds, for people: header, cases, per-layer tables, preprocessing, notes."""
    lines = [f"# {title}", ""]
    for rep in reports:
        lines += [*_header(rep), "", "### Cases", "", *_cases_table(rep), ""]
        for case in rep["cases"]:
            if case["layers"]:
                lines += [*_layer_table(case), ""]
        pre = _preprocessing_table(rep)
        lines += [*pre, ""] if pre else []
        if rep.get("notes"):
            lines += ["### Notes", "", *[f"- {n}" for n in rep["notes"]], ""]
    total = sum(len(r["cases"]) for r in reports)
    failed = sum(not c["passed"] for r in reports for c in r["cases"])
    lines += [f"**{total - failed} passed, {failed} failed**", ""]
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


# Differences of exactly 0 have no place on a log axis: they are drawn at this floor.
_LOG_FLOOR = 1e-12


def _plottable(values) -> list[float]:
    """Differences for a log axis: 0 at the floor, inf (shapes differ) left out (nan)."""
    return [max(v, _LOG_FLOOR) if math.isfinite(v) else math.nan for v in values]


def _title(reports: Sequence[dict]) -> str:
    rep = reports[0]
    cases = [c for r in reports for c in r["cases"]]
    weights = (
        Path(rep["artifact"]).name if rep.get("artifact") else f"in-memory conversion of {Path(rep['source']).name}"
    )
    dtype = f", {rep['dtype']}" if isinstance(rep.get("dtype"), str) else ""
    images = [c for c in cases if c.get("preprocessing_max_abs") is not None]
    inputs = list(dict.fromkeys(c["input"] for c in cases if c.get("preprocessing_max_abs") is None))
    inputs += [f"{len(images)} image{'s' if len(images) > 1 else ''}"] if images else []
    failed = [c for c in cases if not c["passed"]]
    verdict = "PASS" if not failed else f"FAIL ({len(failed)} of {len(cases)} cases)"
    first = next((c for c in failed if c["first_divergent"]), None)
    verdict += f", first divergent layer {first['first_divergent']} ({first['name']})" if first else ""
    more = f" (+{len(reports) - 1} more reports)" if len(reports) > 1 else ""
    return (
        f"efficientnet-{rep['arch']} ({rep['num_classes']} classes), weights {weights} "
        f"({rep['weights']} copy{dtype}){more}\ninput: {'; '.join(inputs)}\n{verdict}"
    )


def _layers_panel(ax, cases: Sequence[dict]) -> None:
    """Per-layer max difference against each layer's own limit; failures crossed, the first divergent marked."""
    longest = max((c["layers"] for c in cases), key=len)
    first: dict[int, list[tuple[float, str]]] = {}  # layer index -> (y, layer) of each case first diverging there
    for i, case in enumerate(cases):
        layers, color = case["layers"], f"C{i % 10}"
        x = list(range(len(layers)))
        diffs = _plottable(layer["max_abs"] for layer in layers)
        ax.plot(x, diffs, marker=".", color=color, label=f"{case['name']}: max |torch - tf|")
        ax.step(x, [layer["tolerance"] for layer in layers], where="mid", linestyle="--", color=color, alpha=0.7)
        bad = [j for j, layer in enumerate(layers) if not layer["passed"]]
        if bad:
            ax.scatter(bad, [diffs[j] for j in bad], marker="x", s=60, color="red", zorder=3)
        if case["first_divergent"]:
            j = [layer["name"] for layer in layers].index(case["first_divergent"])
            y = diffs[j] if math.isfinite(diffs[j]) else layers[j]["tolerance"]
            first.setdefault(j, []).append((y, case["first_divergent"]))
    for j, hits in first.items():  # one mark per layer, however many cases first diverge there
        ax.axvline(j, color="red", linestyle=":", linewidth=1.2)
        label = f"first divergent: {hits[0][1]}" + (f" ({len(hits)} cases)" if len(hits) > 1 else "")
        right = j > len(longest) / 2  # keep the text inside the axes
        ax.annotate(
            label,
            (j, max(y for y, _ in hits)),
            xytext=(-6 if right else 6, 8),
            textcoords="offset points",
            ha="right" if right else "left",
            color="red",
            fontsize=8,
        )
    ax.plot([], [], linestyle="--", color="gray", label="each layer's limit (dashed, per case)")
    if any(not layer["passed"] for c in cases for layer in c["layers"]):
        ax.scatter([], [], marker="x", color="red", label="beyond its limit")
    names = [layer["name"] for layer in longest]
    step = max(1, len(names) // 30)
    ax.set_xticks(range(0, len(names), step), names[::step], rotation=60, fontsize=7, ha="right")
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.set_yscale("log")
    ax.set_xlabel("layer (output of each)")
    ax.set_ylabel("max |torch - tf|")
    ax.set_title("per layer", fontsize=9)
    ax.legend(fontsize=7, ncol=2)


def _cases_panel(ax, cases: Sequence[dict]) -> None:
    """One column per case (input size, given batch, image): its final output's difference and limit."""
    shown = [c for c in cases if c["logits"]]
    x = list(range(len(shown)))
    diffs = _plottable(c["logits"]["max_abs"] for c in shown)
    for passed, marker, color, label in ((True, "o", "green", "within its limit"), (False, "x", "red", "beyond")):
        at = [j for j, c in enumerate(shown) if c["logits"]["passed"] == passed]
        if at:
            ax.scatter(at, [diffs[j] for j in at], marker=marker, s=50, color=color, label=label, zorder=3)
    ax.scatter(x, [c["logits"]["tolerance"] for c in shown], marker="_", s=600, color="black", label="limit")
    for j, d in enumerate(diffs):
        if math.isfinite(d):
            ax.annotate(f"{d:.2g}", (j, d), xytext=(7, -3), textcoords="offset points", fontsize=7)
    ax.set_xticks(x, [c["name"] for c in shown], rotation=20 if len(shown) > 3 else 0, fontsize=8, ha="right")
    ax.set_xlim(-0.6, len(shown) - 0.4)
    ax.set_yscale("log")
    ax.set_xlabel("case (input)")
    final = shown[0]["logits"]["name"] if shown else "logits"
    ax.set_ylabel(f"max |torch - tf| of {final}")
    ax.set_title(f"{final} per case", fontsize=9)
    ax.legend(fontsize=7)


def _preprocessing_panel(ax, images: Sequence[dict]) -> None:
    """Per image: how far effconv's preprocessing is from TensorFlow's (both models get TF's)."""
    diffs = [c["preprocessing_max_abs"] for c in images]
    ax.bar(range(len(images)), diffs, color="C1", width=0.5)
    for j, d in enumerate(diffs):
        ax.annotate(f"{d:.2g}", (j, d), xytext=(0, 3), textcoords="offset points", ha="center", fontsize=7)
    ax.set_xticks(range(len(images)), [c["name"] for c in images], rotation=20 if len(images) > 3 else 0, fontsize=8)
    ax.set_xlim(-0.6, len(images) - 0.4)
    ax.set_ylim(0, 1.25 * max(diffs) or 1.0)  # all 0 (the usual): an axis from 0, not around it
    ax.set_xlabel("image")
    ax.set_ylabel("max |effconv - TF|, 0-255")
    ax.set_title("preprocessing per image (effconv's numpy against TensorFlow's ops)", fontsize=9)


def build_figure(reports: Sequence[dict]):
    """The PNG report as a matplotlib Figure: per-layer panel (when measured), per-case and per-image panels."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    cases = [c for rep in reports for c in rep["cases"]]
    layered = [c for c in cases if c["layers"]]
    images = [c for c in cases if c.get("preprocessing_max_abs") is not None]
    panels = [(_layers_panel, layered)] if layered else []
    if not layered or len(cases) > 1:  # one case's logits are the last point of its per-layer line
        panels.append((_cases_panel, cases))
    if images:
        panels.append((_preprocessing_panel, images))
    heights = [2.0 if draw is _layers_panel else 1.0 for draw, _ in panels]
    fig = Figure(figsize=(11, 1.3 + 3.0 * sum(heights)), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    for ax, (draw, shown) in zip(axes, panels, strict=True):
        draw(ax, shown)
    fig.suptitle(_title(reports) if reports else "effconv parity report", fontsize=10)
    return fig


def to_png(reports: Sequence[dict], path: Path) -> None:
    build_figure(reports).savefig(path, dpi=110)


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
