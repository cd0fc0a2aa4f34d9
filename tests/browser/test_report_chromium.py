"""The HTML report in a real browser: headless Chromium (Debian's, through Playwright), with every
request that is not the report file itself aborted.  Every plotly figure must draw (plotly.js
renders an ``svg.main-svg`` into each ``.plotly-graph-div``), with no console or page errors and
no attempt to reach the network.

Chromium is the session's (tests/browser/conftest.py: Debian's, never ``playwright install``);
without it the test is skipped locally and fails in CI (``CI`` set).
"""

from __future__ import annotations

import pytest
import torch

import lora_lab as ll
from lora_lab.hf.tasks import builtin_task
from lora_lab.viz.report import report

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def report_file(tiny_llama_dir, tmp_path_factory):
    """A report with all five sections (six figures) from a short run on the tiny Llama."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tok = ll.load_model(tiny_llama_dir, device="cpu")
        spec = ll.AdapterSpec(r=4, target_modules="attention-qv")
        model = ll.attach(model, spec)
        data = ll.prepare_dataset(builtin_task("upper", n=48), tok, ll.DataSpec(eval_fraction=0.25))
        out = tmp_path_factory.mktemp("report")
        result = ll.train(model, tok, data, spec=ll.TrainSpec(steps=4, batch_size=8, lr=1e-2,
                                                              eval_every=2, output_dir=str(out)))
        scan = ll.scan_quantization(tiny_llama_dir, schemes=("nf4", "fp4"), progress=False)
        return report(out / "report.html", result=result, spec=spec,
                      spectra=ll.adapter_spectra(model), quant=scan,
                      memory=ll.estimate_memory(model), summary={"accuracy after": "n/a"})
    finally:
        torch.set_num_threads(threads)


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
