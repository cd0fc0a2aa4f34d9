"""TrainingDashboard: the figure holds the logged points, buttons reach a running loop, runs overlay.

Stop clicked in a real, busy kernel (the comm pump) is tested in test_kernel.py.
"""

from __future__ import annotations

import threading

import numpy as np
import plotly.graph_objects as go
import torch

import lora_lab as ll
from lora_lab.train.loop import train
from lora_lab.ui.dashboard import TrainingDashboard
from lora_lab.ui.figure import LiveFigure, resync
from lora_lab.viz.training import TRACES, ema


def tokenized(tok, n=16):
    rows = []
    for i in range(n):
        ids = tok((["abc", "xyz"][i % 2] * 12)[i % 3:][:30])["input_ids"]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)})
    return rows


def with_lora(model):
    try:
        attach = ll.attach
    except ImportError:
        from lora_lab.hf.adapters.attach import attach
    torch.manual_seed(0)
    return attach(model, ll.AdapterSpec(r=4))


def spec(tmp_path, **kw):
    base = dict(steps=6, batch_size=4, lr=1e-2, output_dir=str(tmp_path / "r"))
    return ll.TrainSpec(**{**base, **kw})


def test_figure_holds_the_logged_points_and_runs_overlay(tiny_llama, tmp_path):
    model, tok = tiny_llama
    model = with_lora(model)
    dash = TrainingDashboard(redraw_every_s=0.0)
    res = train(model, tok, tokenized(tok), eval_data=tokenized(tok, 4),
                spec=spec(tmp_path, eval_every=3), callbacks=[dash])
    data = dash.figure.data
    assert len(data) == len(TRACES)
    steps = res.history[res.history.event == "step"]
    evals = res.history[res.history.event == "eval"]
    np.testing.assert_array_equal(data[0].x, steps.step.to_numpy())
    np.testing.assert_allclose(data[0].y, steps.loss.to_numpy())
    np.testing.assert_allclose(data[1].y, ema(steps.loss.to_numpy(), dash.smoothing.value))
    np.testing.assert_allclose(data[2].y, evals.eval_loss.to_numpy())
    np.testing.assert_allclose(data[3].y, steps.lr.to_numpy())
    np.testing.assert_allclose(data[4].y, steps.grad_norm.to_numpy())
    assert isinstance(data[0].y, np.ndarray) and dash.progress.value == 6
    assert dash.stop_button.disabled  # the run is over; the figure stays
    first = data[0].y.copy()
    train(model, tok, tokenized(tok), spec=spec(tmp_path, steps=3, output_dir=str(tmp_path / "s")),
          callbacks=[dash])
    assert len(dash.figure.data) == 2 * len(TRACES) and len(dash.runs) == 2
    np.testing.assert_allclose(dash.figure.data[0].y, first)  # run 1 kept, run 2 overlaid
    assert len(dash.figure.data[len(TRACES)].x) == 3
    # resuming run 1 continues its curve instead of adding a run
    train(model, tok, tokenized(tok), spec=spec(tmp_path, steps=8), callbacks=[dash],
          resume_from=tmp_path / "r")
    assert len(dash.runs) == 2
    np.testing.assert_array_equal(dash.figure.data[0].x, np.arange(1, 9))


def test_stop_button_clicked_from_another_thread_while_training(tiny_llama, tmp_path):
    model, tok = tiny_llama
    model = with_lora(model)
    dash = TrainingDashboard()
    seen, clicked = threading.Event(), threading.Event()

    class Watch:
        def on_step(self, state, control):
            if state.step == 2:
                seen.set()
                assert clicked.wait(60)  # the click lands while this step's callbacks run

    def click():
        seen.wait(60)
        dash.stop_button.click()
        clicked.set()

    t = threading.Thread(target=click)
    t.start()
    res = train(model, tok, tokenized(tok), spec=spec(tmp_path, steps=50), callbacks=[Watch(), dash])
    t.join()
    assert res.stop_reason == "stopped: Stop button" and res.steps == 2
    assert res.adapter_path.endswith("checkpoint-000002")


def test_pause_and_save_buttons(tiny_llama, tmp_path):
    model, tok = tiny_llama
    model = with_lora(model)
    dash = TrainingDashboard()
    waiting = threading.Event()

    class Press:
        def on_step(self, state, control):
            if state.step == 1:
                dash.save_button.click()
                dash.pause_button.value = True
                # resume from another thread once the loop really waits (its first `wait` event)
                threading.Thread(target=lambda: waiting.wait(60) and setattr(
                    dash.pause_button, "value", False)).start()

        def on_wait(self, state, control):
            waiting.set()

    res = train(model, tok, tokenized(tok), spec=spec(tmp_path, steps=3), callbacks=[Press(), dash])
    assert waiting.is_set()  # the run did pause
    assert res.stop_reason == "completed"
    assert sorted(p.name for p in (tmp_path / "r").glob("checkpoint-*")) == [
        "checkpoint-000001", "checkpoint-000003"]
    assert dash.pause_button.description == "Pause"


def test_smoothing_and_log_scale_controls():
    dash = TrainingDashboard()
    rows = [{"event": "step", "step": i, "loss": float(v)} for i, v in
            enumerate([4.0, 3.0, 3.5, 2.0, 2.5], start=1)]
    dash.runs["a"] = rows
    dash.smoothing.value = 0.5
    y = dash.figure.data[1].y
    # oracle: debiased EMA by hand
    m, want = 0.0, []
    for k, v in enumerate([4.0, 3.0, 3.5, 2.0, 2.5], start=1):
        m = 0.5 * m + 0.5 * v
        want.append(m / (1 - 0.5 ** k))
    np.testing.assert_allclose(y, want)
    dash.log_y.value = True
    assert dash.figure.layout.yaxis.type == "log"


def test_throttled_redraws(tiny_llama, tmp_path):
    model, tok = tiny_llama
    model = with_lora(model)
    dash = TrainingDashboard(redraw_every_s=3600)
    train(model, tok, tokenized(tok), spec=spec(tmp_path, steps=5), callbacks=[dash])
    assert dash.redraws == 2  # the first step, then only the final draw at the end
    np.testing.assert_array_equal(dash.figure.data[0].x, [1, 2, 3, 4, 5])


def test_long_runs_are_thinned_and_the_incremental_curves_match_the_history():
    from lora_lab.train.events import Control, TrainState
    from lora_lab.viz.training import run_arrays

    dash = TrainingDashboard(max_points=500, redraw_every_s=3600)
    n, rng = 3000, np.random.default_rng(0)
    dash.on_begin(TrainState(event="begin", step=0, max_steps=n, run="long"), Control())
    for i in range(1, n + 1):
        dash.on_step(TrainState(event="step", step=i, max_steps=n, loss=float(rng.uniform(1, 3)),
                                lr=1e-3, rss_mb=1.0), None)
    dash.on_end(TrainState(event="end", step=n, max_steps=n), None)
    x, y = dash.figure.data[0].x, dash.figure.data[1].y
    assert len(x) <= 500 and x[0] == 1 and x[-1] == n
    full = run_arrays(dash.runs["long"])
    want = ema(full["loss"], dash.smoothing.value)
    np.testing.assert_allclose(y, want[(x - 1).astype(int)])
    dash.smoothing.value = 0.9  # a new weight recomputes the kept curve
    np.testing.assert_allclose(dash._curves["long"].arrays()["loss_smoothed"], ema(full["loss"], 0.9))


def test_static_fallback_and_resync():
    fig = go.Figure(go.Scatter(x=np.arange(3), y=np.arange(3)))
    static = LiveFigure(fig, static=True)
    assert isinstance(static.figure, go.Figure) and not isinstance(static.figure, go.FigureWidget)
    with static.batch_update() as f:
        f.data[0].y = np.array([5, 6, 7])
    np.testing.assert_array_equal(static.figure.data[0].y, [5, 6, 7])
    live = LiveFigure(go.Figure())
    assert isinstance(live.figure, go.FigureWidget)
    live.figure.add_scatter(x=np.arange(4), y=np.ones(4))  # added after construction
    assert len(live.figure._widget_data) == 0  # what a late view would see: nothing
    resync(live.figure)
    assert len(live.figure._widget_data) == 1
    np.testing.assert_array_equal(live.figure._widget_data[0]["y"], np.ones(4))
    dash = TrainingDashboard(static=True)
    assert dash.live.static and isinstance(dash.figure, go.Figure)


def test_status_line_shows_tokens_and_supervised_tokens_per_second():
    from lora_lab.train.events import Control, TrainState

    dash = TrainingDashboard(redraw_every_s=3600)
    dash.on_begin(TrainState(event="begin", step=0, max_steps=10, run="tps"), Control())
    dash.on_step(TrainState(event="step", step=1, max_steps=10, loss=2.0, tokens_per_s=4012.4,
                            supervised_tokens_per_s=1203.2, rss_mb=1.0), None)
    status = dash.status.value
    assert "4,012 tok/s</span>" in status and "1,203 supervised</span>" in status
    assert "prompt and response" in status and "labels ≠ -100" in status  # the tooltips say which
