"""What a person sees: every lora_lab widget in JupyterLab's light and dark themes, and in Notebook 7
at about Colab's output width (~800 px), checked as a reader would check it.

One notebook builds the widgets of test_browser_widgets.py, a dashboard that has trained a short
cosine-schedule run from lr 3e-3 (so every panel holds curves), and the same run in the static
fallback figure (what VS Code and Colab without the custom widget manager get).  For each widget
(:func:`conftest.look_problems`): no content wider than the widget unless it scrolls inside it,
distinct tick labels on every axis of every figure, text contrast of at least 4.5:1 (WCAG AA)
against what is really behind it; and no console errors on the page.  With
``LORA_LAB_SCREENSHOTS`` set, each widget is saved as ``<widget>-<theme>.png`` (JupyterLab pages).
"""

from __future__ import annotations

import pytest
from conftest import (
    close_page,
    console_errors,
    look_problems,
    open_notebook,
    plot_data,
    save_screenshot,
    set_theme,
    wait_theme,
    wait_until,
    widget_problems,
    write_notebook,
)
from test_browser_widgets import CELLS

pytestmark = pytest.mark.browser

# the README's dashboard picture: builtin:tiny (trained, not random) learning a new task, so the
# loss falls as a user's would; the run is named as a user's is ("<time>-<adapter>" by default)
TRAIN = '''
import tempfile, pathlib
dash = TrainingDashboard(redraw_every_s=0.2)
dash.add_class("ll-dash")
display(dash)
tmodel, ttok = ll.load_model("builtin:tiny")
tmodel = ll.attach(tmodel, ll.AdapterSpec(r=4, alpha=8), name="upper")
data = ll.prepare_dataset(ll.builtin_task("upper", n=64, seed=0), ttok, ll.DataSpec(max_length=32))
result = ll.train(tmodel, ttok, data, spec=ll.TrainSpec(steps=30, batch_size=8, lr=3e-3, schedule="cosine",
                  output_dir=str(pathlib.Path(tempfile.mkdtemp()) / "upper-r4")), callbacks=[dash])
'''
STATIC = '''
still = TrainingDashboard(static=True)
still.add_class("ll-dash-static")
still.runs.update(dash.runs)
still.redraw_all()
still
'''
# What the issue saw, rebuilt on purpose, to show that the checks catch it: a DataFrame table with
# a long path (wider than the output), an lr axis with one significant digit ("3e-3" on every
# tick) and a fixed dark-grey message (unreadable on a dark theme).
BAD = '''
import ipywidgets as W, pandas as pd, plotly.graph_objects as go
wide = pd.DataFrame({"source": ["/tmp/" + "x" * 150], "targets": [",".join(["down_proj"] * 12)]})
bad_fig = go.FigureWidget(go.Scatter(y=[3e-3, 2.995e-3, 2.99e-3]),
                          layout=dict(yaxis=dict(tickformat=".1~e"), height=250))
bad = W.VBox([W.HTML(wide.to_html()), W.HTML("<span style='color:#444'>a message</span>"), bad_fig])
bad.add_class("ll-bad")
bad
'''
# widget class -> screenshot name
WIDGETS = {"ll-designer": "designer", "ll-rank": "rank_explorer", "ll-quant": "quant_explorer",
           "ll-switch": "switchboard", "ll-dash": "dashboard", "ll-dash-static": "dashboard_static"}
# (front end, theme, viewport width): Notebook 7 at 860 px leaves Colab's ~800 px for outputs
PAGES = [("lab", "light", 1280), ("lab", "dark", 1280), ("notebook", "dark", 860)]


@pytest.fixture(scope="module", params=PAGES, ids=lambda p: f"{p[0]}-{p[1]}-{p[2]}px")
def look_page(request, browser, jupyter):
    frontend, theme, width = request.param
    set_theme(jupyter, theme)
    name = write_notebook(jupyter, f"look_{frontend}_{theme}.ipynb", [*CELLS[:-1], TRAIN, STATIC, BAD])
    try:
        page = open_notebook(browser, jupyter, name, frontend, viewport=(width, 1400))
    finally:
        set_theme(jupyter, "light")               # the other browser tests use the light theme
    wait_theme(page, theme)
    page.frontend, page.theme, page.width = frontend, theme, width
    yield page
    close_page(page)


def test_every_widget_reads_well(look_page):
    page = look_page
    wait_until(lambda: "30/30" in page.locator(".ll-dash").text_content(), what="the run to end")
    page.locator(".ll-dash-static").scroll_into_view_if_needed()
    wait_until(lambda: all(p["svg"] for p in plot_data(page, ".ll-dash-static")) and
               plot_data(page, ".ll-dash-static"), what="the static figure")
    if page.width < 1000:   # the narrow page really is about Colab's output width
        width = page.locator(".jp-OutputArea-output").first.bounding_box()["width"]
        assert 650 < width < 820, width
    problems = {}
    for cls, shot in WIDGETS.items():
        widget = page.locator(f".{cls}")
        widget.scroll_into_view_if_needed()         # JupyterLab draws only the cells in view
        widget.wait_for(state="visible")
        found = look_problems(page, f".{cls}")
        if found:
            problems[cls] = found
        if page.frontend == "lab":
            save_screenshot(widget, f"{shot}-{page.theme}.png")
    assert problems == {}, f"{page.frontend}, {page.theme}, {page.width}px: {problems}"
    assert widget_problems(page) == []
    errors = console_errors(page)
    assert errors == [], "console errors:\n" + "\n".join(errors)


def test_the_dashboard_shows_distinct_lr_ticks_and_smoothed_throughput(look_page):
    """The learning-rate axis of a 30-step cosine decay from 3e-3 (one significant digit printed
    "3e-3" on every tick), and the tokens/s panel: raw points plus the smoothed line."""
    page = look_page
    wait_until(lambda: "30/30" in page.locator(".ll-dash").text_content(), what="the run to end")
    for scope in (".ll-dash", ".ll-dash-static"):
        page.locator(scope).scroll_into_view_if_needed()
        ticks = page.locator(scope).first.evaluate("""root => {
            const gd = root.querySelector('.js-plotly-plot');
            const y = gd._fullLayout.xaxis2.anchor;          // the learning-rate panel: x2 and y2
            const layer = gd.querySelector(`.subplot.x2${y} .yaxislayer-above`);
            return Array.from(layer.querySelectorAll('text')).map(t => t.textContent); }""")
        assert len(ticks) >= 3 and len(set(ticks)) == len(ticks), (scope, ticks)
        (plot,) = plot_data(page, scope)
        names = plot["names"]
        raw = names.index(next(n for n in names if n.endswith("· tokens/s")))
        smooth = names.index(next(n for n in names if "tokens/s (EMA" in n))
        assert len(plot["y"][raw]) == len(plot["y"][smooth]) == 30, scope
        assert any("peak RSS" in n for n in names), names


def test_the_checks_catch_what_the_issue_saw(look_page):
    page = look_page
    page.locator(".ll-bad").scroll_into_view_if_needed()
    wait_until(lambda: plot_data(page, ".ll-bad") and plot_data(page, ".ll-bad")[0]["svg"],
               what="the bad figure")
    found = " | ".join(look_problems(page, ".ll-bad"))
    assert "past the widget's edge" in found or "wider than its output" in found, found
    assert "repeated tick labels" in found, found
    assert ("contrast" in found) == (page.theme == "dark"), found   # #444 reads on white only
