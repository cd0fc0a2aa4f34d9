"""TrainingDashboard in a real browser: the loss plot grows while a cell trains, and the Stop and
Pause/Resume buttons reach the busy kernel (lora_lab pumps the kernel's queue between steps).

The notebook trains for 100,000 steps, so only the Stop button can end the cell.  The checks:
points are added to the plotted loss while the cell runs; Pause holds the step count (and the
plot) still, Resume moves it again; Stop ends the run with ``stopped: Stop button``, the cell after
it runs (the kernel answers), and the adapter is on disk in the run folder.
"""

from __future__ import annotations

import json
import re

import pytest
from conftest import (
    FRONTENDS,
    WAIT_MS,
    plot_data,
    save_screenshot,
    wait_for_output,
    wait_until,
    widget_problems,
    write_notebook,
)

pytestmark = pytest.mark.browser

TRAIN = '''
import os, torch, lora_lab as ll
from lora_lab.ui import TrainingDashboard
torch.set_num_threads(1)
model, tok = ll.load_model("builtin:tiny-random")
model = ll.attach(model, ll.AdapterSpec(r=4, alpha=8))
data = ll.prepare_dataset(ll.builtin_task("upper", n=256, seed=0), tok, ll.DataSpec(max_length=32))
dash = TrainingDashboard(redraw_every_s=0.2, max_points=100_000)
dash.add_class("ll-dash")
display(dash)
result = ll.train(model, tok, data, spec=ll.TrainSpec(steps=100_000, batch_size=8, lr=3e-3,
                                                      output_dir={out!r}), callbacks=[dash])
'''
AFTER = '''import json
print("AFTER-RUN " + json.dumps({"reason": result.stop_reason, "steps": result.steps,
                                 "adapter": str(result.adapter_path)}))
'''


def step_of(page) -> int:
    text = page.locator(".ll-dash .widget-html-content").filter(
        has_text=re.compile(r"\d+/100000")).first.inner_text()
    return int(re.search(r"(\d+)/100000", text).group(1))


def loss_points(page) -> int:
    plots = plot_data(page, ".ll-dash")
    return len(plots[0]["x"][0] or []) if plots and plots[0]["traces"] else 0


def dash_text(page) -> str:
    return page.locator(".ll-dash").inner_text()


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_training_plot_grows_and_stop_pause_resume_reach_the_kernel(notebook_page, jupyter,
                                                                   frontend):
    out = jupyter.root / f"run_{frontend}"
    name = write_notebook(jupyter, f"train_{frontend}.ipynb", [TRAIN.format(out=str(out)), AFTER])
    page = notebook_page(name, frontend, wait_done=None)
    page.locator(".ll-dash").wait_for(state="visible", timeout=WAIT_MS)
    # the loss plot gains points while the cell runs
    first = wait_until(lambda: loss_points(page), timeout_s=120, what="the first loss points")
    wait_until(lambda: loss_points(page) > first, what="more loss points")
    # Pause: the step count and the plot stand still
    page.locator(".ll-dash button").filter(has_text="Pause").click()
    wait_until(lambda: "paused" in dash_text(page), what="the paused status")
    held, points = step_of(page), loss_points(page)
    page.wait_for_timeout(2000)
    assert step_of(page) == held and loss_points(page) == points, "training went on paused"
    # Resume: it moves again
    page.locator(".ll-dash button").filter(has_text="Resume").click()
    wait_until(lambda: step_of(page) > held, what="training to resume")
    wait_until(lambda: loss_points(page) > points, what="the plot to grow again")
    # Stop: the run ends, the adapter is saved, the next cell runs
    page.locator(".ll-dash button").filter(has_text="Stop").click()
    wait_for_output(page, "AFTER-RUN", timeout_ms=120_000)
    after = json.loads(page.locator(".jp-OutputArea-output").filter(
        has_text="AFTER-RUN").first.inner_text().split("AFTER-RUN", 1)[1])
    assert after["reason"] == "stopped: Stop button"
    assert held < after["steps"] < 100_000
    wait_for_output(page, "LL-CELLS-DONE")             # the kernel went on to the last cell
    # on disk: the checkpoint named by `latest` holds the adapter in safetensors
    latest = out / (out / "latest").read_text().strip()
    assert (latest / "adapter_model.safetensors").stat().st_size > 0
    assert (latest / "adapter_config.json").exists()
    assert json.loads((latest / "progress.json").read_text())["step"] == after["steps"]
    # in the DOM: the final status, disabled buttons, and every step plotted
    wait_until(lambda: "stopped: Stop button" in dash_text(page), what="the stopped status")
    assert page.locator(".ll-dash button").filter(has_text="Stop").is_disabled()
    assert step_of(page) == after["steps"]
    final = wait_until(lambda: (lambda p: p if p[0]["x"][0] and p[0]["x"][0][-1] ==
                                after["steps"] else None)(plot_data(page, ".ll-dash")),
                       what="the last step in the plot")
    assert len(final[0]["x"][0]) == after["steps"]
    assert widget_problems(page) == []
    if frontend == "lab":
        save_screenshot(page.locator(".ll-dash"), "dashboard.png")
