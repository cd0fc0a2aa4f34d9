"""``lora_lab.viz.report.report``: one self-contained HTML file with a section per input given.

Self-contained means: plotly.js is in the file exactly once, no ``<script src>`` or stylesheet link
points anywhere, and each figure is drawn by its own ``Plotly.newPlot`` call.
"""

from __future__ import annotations

import re

import pytest
from plotly.offline import get_plotlyjs

import lora_lab as ll
from lora_lab.viz.report import page, report

pytestmark = pytest.mark.usefixtures("one_thread")
BUNDLE_HEAD = get_plotlyjs()[:200]


@pytest.fixture(scope="module")
def run(report_inputs):
    return report_inputs


def _self_contained(text: str) -> None:
    assert text.count(BUNDLE_HEAD) == 1                                   # plotly.js inlined once
    assert not re.search(r"<script[^>]*\bsrc\s*=", text, re.I)            # nothing to download
    assert not re.search(r"<link[^>]*\bhref\s*=\s*['\"]?https?:", text, re.I)
    assert "<meta charset='utf-8'>" in text


def test_full_report_has_every_section_and_figure(run, tmp_path):
    path = report(tmp_path / "deep" / "run.html", **run, summary={"accuracy after": "87.5%"},
                  title="tiny <run>")
    assert path == tmp_path / "deep" / "run.html" and path.exists()
    text = path.read_text(encoding="utf-8")
    _self_contained(text)
    for sid in ("summary", "specs", "training", "spectra", "quantization", "memory"):
        assert f"<section id='{sid}'>" in text
    # training curves + (spectra heatmap, spectrum) + (quant heatmap, scheme bars) + memory bars
    assert text.count("Plotly.newPlot(") == 6
    assert "<h1>tiny &lt;run&gt;</h1>" in text and "87.5%" in text
    assert "AdapterSpec" in text and "TrainSpec" in text           # the TrainSpec comes with result
    assert "<td>target_modules</td>" in text and "<td>use_rslora</td>" in text
    assert "<td>eval_every</td>" in text                            # a TrainSpec field
    assert repr(run["result"]).split(",")[0] in text
    assert all(name in text for name in run["spectra"].table["name"])
    assert all(name in text for name in run["quant"].table["name"])
    for scenario, verdict in run["memory"].verdicts().items():
        assert scenario in text and verdict in text


def test_sections_appear_only_for_what_is_given(run, tmp_path):
    text = report(tmp_path / "m.html", memory=run["memory"]).read_text(encoding="utf-8")
    _self_contained(text)
    assert "<section id='memory'>" in text and text.count("Plotly.newPlot(") == 1
    for sid in ("training", "spectra", "quantization", "specs"):
        assert f"<section id='{sid}'>" not in text
    text = report(tmp_path / "s.html", spec=[run["spec"]]).read_text(encoding="utf-8")
    assert "Plotly.newPlot(" not in text and "<section id='specs'>" in text
    assert text.count(BUNDLE_HEAD) == 1


def test_page_inlines_plotly_once_for_many_figures():
    import plotly.graph_objects as go

    figs = [go.Figure(go.Scatter(x=[0, 1], y=[i, i + 1])) for i in range(3)]
    text = page("three", [("a", "A", figs[:2]), ("b", "B", [figs[2], "note <b>"])])
    _self_contained(text)
    assert text.count("Plotly.newPlot(") == 3 and "note &lt;b&gt;" in text


def test_bad_inputs_raise_lora_lab_errors(run, tmp_path):
    with pytest.raises(ll.LoraLabError, match="nothing to report"):
        report(tmp_path / "x.html")
    with pytest.raises(ll.LoraLabError, match="TrainResult"):
        report(tmp_path / "x.html", result={"loss": 1.0})
    with pytest.raises(ll.LoraLabError, match="adapter_spectra"):
        report(tmp_path / "x.html", spectra=run["quant"])
    with pytest.raises(ll.LoraLabError, match="not a spec"):
        report(tmp_path / "x.html", spec=[3])
    with pytest.raises(ll.LoraLabError, match="folder"):
        report(tmp_path, memory=run["memory"])
    assert not (tmp_path / "x.html").exists()
