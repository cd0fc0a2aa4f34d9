"""The plotly paths and the error detector, in both front ends.

* **Static fallback.**  With ``LORA_LAB_STATIC_FIGURES=1`` (or ``static=True``) the widgets draw a
  plain ``go.Figure`` into an ``Output`` instead of a FigureWidget.  The page is opened with
  anywidget's front end blocked, as in a front end that cannot load FigureWidget's view (VS Code's
  "Failed to load view class AnyView", Colab without the custom widget manager): the figures must
  still be drawn, update on interaction, and show every training step.
* **The detector can fail.**  A notebook with deliberately broken widgets (a view module that does
  not exist, a widget model that does not exist, a FigureWidget whose front end is blocked, a
  traceback) must make :func:`conftest.widget_problems` report each one, while a healthy widget
  beside them is not reported.  This is what every other browser test asserts is empty.
"""

from __future__ import annotations

import re

import pytest
from conftest import FRONTENDS, plot_data, wait_until, widget_problems, write_notebook

pytestmark = pytest.mark.browser

NO_ANYWIDGET = ("**/extensions/anywidget/**",)   # JupyterLab's and Notebook 7's federated modules

STATIC = [
    '''import os
os.environ["LORA_LAB_STATIC_FIGURES"] = "1"
import torch, lora_lab as ll
from lora_lab.ui import AdapterDesigner, QuantExplorer, RankExplorer, TrainingDashboard
from lora_lab.ui.figure import figure_widget_available
torch.set_num_threads(1)
assert not figure_widget_available()
MODEL = "builtin:tiny-random"''',
    'designer = AdapterDesigner(MODEL)\ndesigner.add_class("ll-designer")\ndesigner',
    'quant = QuantExplorer(ll.load_model(MODEL)[0], static=True)\nquant.add_class("ll-quant")\n'
    'quant',
    '''model, tok = ll.load_model(MODEL)
model = ll.attach(model, ll.AdapterSpec(r=4, alpha=8))
data = ll.prepare_dataset(ll.builtin_task("upper", n=64, seed=0), tok, ll.DataSpec(max_length=32))
dash = TrainingDashboard(redraw_every_s=0.2, static=True)
dash.add_class("ll-dash")
display(dash)
result = ll.train(model, tok, data, spec=ll.TrainSpec(steps=12, batch_size=4, lr=3e-3,
                  output_dir="run_static"), callbacks=[dash])''',
    'explorer = RankExplorer(model, static=True)\nexplorer.add_class("ll-rank")\nexplorer',
]


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_static_fallback_draws_figures_without_anywidget(notebook_page, jupyter, frontend):
    name = write_notebook(jupyter, f"static_{frontend}.ipynb", STATIC)
    page = notebook_page(name, frontend, block=NO_ANYWIDGET)
    for cls, n in (("ll-designer", 1), ("ll-quant", 2), ("ll-dash", 1), ("ll-rank", 2)):
        plots = wait_until(lambda: [p for p in plot_data(page, f".{cls}") if p["svg"]],
                           what=f"{cls}'s static figures")
        assert len(plots) == n, (cls, plots)
        assert all(p["traces"] > 0 and p["height"] > 100 for p in plots), (cls, plots)
        # drawn by plotly's mime renderer inside an Output, not by a FigureWidget view
        assert page.locator(f".{cls} .widget-output .js-plotly-plot").count() == n
    # every training step is in the static plot
    loss = plot_data(page, ".ll-dash")[0]
    assert loss["x"][0] == list(range(1, 13))
    # an interaction redraws the static figure: rank 8 -> 32 grows the adapter's memory
    (chart,) = plot_data(page, ".ll-designer")
    rank = page.locator(".ll-designer .widget-text").filter(has_text="rank r").locator("input")
    rank.fill("32")
    rank.press("Enter")
    wait_until(lambda: plot_data(page, ".ll-designer")[0]["y"] != chart["y"],
               what="the static memory chart to be redrawn")
    problems = widget_problems(page)
    assert problems == [], problems


BROKEN = [
    'import ipywidgets as w\nw.IntSlider(value=3, description="healthy")',
    '''import ipywidgets as w, traitlets
class Broken(w.DOMWidget):
    _view_name = traitlets.Unicode("NoSuchView").tag(sync=True)
    _view_module = traitlets.Unicode("lora-lab-no-such-module").tag(sync=True)
    _view_module_version = traitlets.Unicode("0.0.1").tag(sync=True)
Broken()''',
    '''from IPython.display import display
display({"application/vnd.jupyter.widget-view+json":
         {"model_id": "0123456789abcdef0123456789abcdef", "version_major": 2, "version_minor": 0}},
        raw=True)''',
    'import plotly.graph_objects as go\ngo.FigureWidget(go.Bar(y=[1, 2, 3]))',
    'raise ZeroDivisionError("on purpose")',
]


def cell_problems(page, i: int) -> list[str]:
    return widget_problems(page, page.locator(".jp-Notebook .jp-Cell").nth(i))


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_the_detector_reports_each_broken_widget(notebook_page, jupyter, frontend):
    name = write_notebook(jupyter, f"broken_{frontend}.ipynb", BROKEN, done=False)
    page = notebook_page(name, frontend, block=NO_ANYWIDGET, wait_done="on purpose")
    page.locator(".jp-Cell").nth(0).locator(".widget-slider").wait_for(state="visible")
    wait_until(lambda: all(cell_problems(page, i) for i in (1, 2, 3)), timeout_s=30,
               what="every broken widget to show its error")
    assert cell_problems(page, 0) == []                    # the healthy slider: not reported
    assert re.search("Failed to load (view|model) class|javascript error",
                     " ".join(cell_problems(page, 1)))     # unknown view module
    assert any("model not found" in p for p in cell_problems(page, 2))
    assert any("anywidget" in p or "javascript error" in p for p in cell_problems(page, 3))
    assert any("Traceback" in p for p in cell_problems(page, 4))
    # and so the assertion every browser test makes would fail the suite
    with pytest.raises(AssertionError):
        assert widget_problems(page) == []
