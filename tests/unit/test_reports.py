"""Issue 11 section 6: the PNG is a figure worth looking at, and the Markdown carries what the JSON carries."""

from __future__ import annotations

import matplotlib.image
import numpy as np
from matplotlib.lines import Line2D
from matplotlib.text import Annotation

from effconv.parity.reports import build_figure, to_markdown, to_png
from effconv.parity.verify import CaseResult, LayerDiff, VerifyReport, endpoint_order

VERSIONS = {"effconv": "0", "torch": "2", "tensorflow": "2", "numpy": "2", "python": "3"}


def _layer(name: str, diff: float, scale: float) -> LayerDiff:
    limit = 1e-3 * max(1.0, scale)
    return LayerDiff(name, [2, 7], diff, diff / scale, scale, limit, diff <= limit)


def _case(name: str, diff: float, *, broken_at: int | None = None, image: bool = False) -> CaseResult:
    layers = []
    if broken_at is not None:
        for i, layer in enumerate(endpoint_order(16, True)):
            layers.append(_layer(layer, 10.0 if i >= broken_at else 1e-5 * (i + 1), 2.0 + i))
    logits = layers[-1] if layers else _layer("logits", diff, 7.0)
    case = CaseResult(name, f"image {name}" if image else f"N(0,1) {name}", 2, [224, 224], logits, 0.99, 1.0, 1.0)
    case.layers = layers
    case.first_divergent = next((x.name for x in layers if not x.passed), None)
    case.preprocessing_max_abs = 0.5 if image else None
    return case


def _report(*cases: CaseResult, **extra) -> dict:
    rep = VerifyReport(
        "b0", 1000, "ema", "/ckpt", {"model.ckpt.index": "ab12"}, "/out/b0.pth", 1e-3, 0.0, list(cases), VERSIONS
    )
    rep.notes.append("a note")
    return rep.to_dict() | extra


def test_without_per_layer_each_case_has_its_own_labelled_column():
    fig = build_figure([_report(_case("b0@224", 3e-5), _case("b0@97", 2e-6))])
    (ax,) = fig.axes
    assert ax.get_yscale() == "log" and ax.get_xlabel() == "case (input)" and "logits" in ax.get_ylabel()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["b0@224", "b0@97"]
    points = np.concatenate([c.get_offsets() for c in ax.collections if len(c.get_offsets())])
    assert set(points[:, 0]) == {0, 1}  # one column per case, not all at x=0
    title = fig._suptitle.get_text()
    assert "efficientnet-b0" in title and "b0.pth" in title and "N(0,1) b0@97" in title and "PASS" in title


def test_per_layer_plot_draws_each_layers_limit_and_marks_the_first_divergent():
    case = _case("b0@224", 0, broken_at=10)  # block_9
    fig = build_figure([_report(case)])
    (ax,) = fig.axes
    assert ax.get_yscale() == "log" and ax.get_ylabel() and ax.get_xlabel()
    lines = {tuple(np.round(line.get_ydata(), 12)) for line in ax.get_lines() if len(line.get_ydata()) > 2}
    assert tuple(np.round([x.tolerance for x in case.layers], 12)) in lines  # each layer's own limit
    assert tuple(np.round([x.max_abs for x in case.layers], 12)) in lines
    marks = [line for line in ax.get_lines() if list(line.get_xdata()) == [10, 10]]  # axvline at block_9
    assert marks and all(isinstance(m, Line2D) for m in marks)
    notes = [t.get_text() for t in ax.get_children() if isinstance(t, Annotation)]
    assert "first divergent: block_9" in notes
    assert "block_9" in fig._suptitle.get_text() and "FAIL" in fig._suptitle.get_text()


def test_image_sets_get_per_image_logits_and_preprocessing(tmp_path):
    cases = [_case("b0@224", 3e-5), _case("cat.jpg", 2e-4, image=True), _case("dog.png", 5.0, image=True)]
    fig = build_figure([_report(*cases)])
    per_case, pre = fig.axes
    assert [t.get_text() for t in per_case.get_xticklabels()] == ["b0@224", "cat.jpg", "dog.png"]
    assert [t.get_text() for t in pre.get_xticklabels()] == ["cat.jpg", "dog.png"] and "0-255" in pre.get_ylabel()
    assert [p.get_height() for p in pre.patches] == [0.5, 0.5]
    assert "2 images" in fig._suptitle.get_text()
    to_png([_report(*cases)], tmp_path / "r.png")
    pixels = matplotlib.image.imread(tmp_path / "r.png")
    assert pixels.ndim == 3 and pixels.std() > 0.05


def test_markdown_carries_the_json():
    broken = _case("b0@224", 0, broken_at=10)
    text = to_markdown([_report(broken, _case("cat.jpg", 2e-4, image=True), dtype="float16")])
    for layer in broken.layers:
        assert f"| {layer.name} | 2x7 | {layer.max_abs:.3g} | {layer.tolerance:.3g} |" in text
    assert "| block_9 | 2x7 | 10 | 0.012 | 0.833 | 12 | **FAIL** (first divergent layer) |" in text
    assert "| block_8 | 2x7 | 0.0001 | 0.011 | 9.09e-06 | 11 | PASS |" in text
    assert "| cat.jpg | 0.5 |" in text  # the preprocessing difference, per image
    assert "model.ckpt.index ab12" in text and "/out/b0.pth (ema copy)" in text and "- a note" in text
    assert "| dtype | float16 |" in text  # a key this renderer does not know still shows
    assert "**1 passed, 1 failed**" in text
