"""The HTML report in a real browser: headless Chromium (Debian's, through Playwright), with every
request that is not the report file itself aborted.  Every plotly figure must draw (plotly.js
renders an ``svg.main-svg`` into each ``.plotly-graph-div``), with no console or page errors and
no attempt to reach the network.

Chromium is the session's (tests/browser/conftest.py: Debian's, never ``playwright install``);
without it the test is skipped locally and fails in CI (``CI`` set).
"""

from __future__ import annotations

import pytest

from lora_lab.viz.report import report

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def report_file(report_inputs, tmp_path_factory):
    """A report with all five sections (six figures), from tests/conftest.py's short run."""
    out = tmp_path_factory.mktemp("report")
    return report(out / "report.html", **report_inputs, summary={"accuracy after": "n/a"})


def test_report_renders_every_figure_offline(report_file, chromium):
    expected = report_file.read_text(encoding="utf-8").count("Plotly.newPlot(")
    assert expected == 6
    blocked, errors = [], []
    page = chromium.new_page()
    try:
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))

        def route(r):
            if r.request.url.startswith("file:"):
                r.continue_()
            else:
                blocked.append(r.request.url)
                r.abort()

        page.route("**/*", route)
        page.goto(report_file.as_uri(), wait_until="load")
        page.wait_for_function(
            "n => { const d = document.querySelectorAll('.plotly-graph-div');"
            " return d.length === n && [...d].every(x => x.querySelector('.main-svg')); }",
            arg=expected, timeout=60_000)
        drawn = page.evaluate(
            "() => [...document.querySelectorAll('.plotly-graph-div')].map(d =>"
            " [d.querySelectorAll('.main-svg').length, (d.data || []).length,"
            "  d.getBoundingClientRect().height])")
        sections = page.evaluate("() => [...document.querySelectorAll('section')].map(s => s.id)")
    finally:
        page.close()
    assert len(drawn) == expected
    for svgs, traces, height in drawn:
        assert svgs >= 1 and traces >= 1 and height > 100     # drawn, with data, not collapsed
    assert sections == ["summary", "specs", "training", "spectra", "quantization", "memory"]
    assert errors == [] and blocked == []
