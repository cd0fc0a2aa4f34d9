"""What the training figure shows a reader: learning-rate ticks that differ, a smoothed throughput
line that is the EMA, and memory as the peak so far.

Oracles from outside lora_lab: the learning rates come from transformers' own cosine schedule; the
EMA and the running maximum are written out by hand, value by value.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import get_cosine_schedule_with_warmup

from lora_lab.train.events import Control, TrainState
from lora_lab.ui.dashboard import TrainingDashboard
from lora_lab.viz.ticks import distinct_ticks
from lora_lab.viz.training import TRACES, run_arrays, training_figure


def cosine_lrs(peak=3e-3, steps=200, warmup=0):
    """The learning rate of each step of transformers' cosine schedule from ``peak``."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = get_cosine_schedule_with_warmup(opt, warmup, steps)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return np.array(out)


def hand_ema(values, w):
    m, k, out = 0.0, 0, []
    for v in values:
        m, k = w * m + (1 - w) * v, k + 1
        out.append(m / (1 - w ** k))
    return np.array(out)


@pytest.mark.parametrize("seen", [3, 10, 40, 120, 200])
def test_lr_ticks_are_distinct_for_a_cosine_decay_from_3e_3(seen):
    lrs = cosine_lrs()[:seen]            # a run seen part way: 3e-3 decayed only a little at first
    assert lrs.max() - lrs.min() > 0
    vals, labels = distinct_ticks(lrs.min(), lrs.max())
    assert len(vals) >= 2 and len(set(labels)) == len(labels), labels
    # one significant digit (plotly's ".1~e", the old axis) collapses them: what the issue saw
    if seen <= 40:
        assert len({f"{v:.0e}" for v in vals}) < len(vals)
    span = lrs.max() - lrs.min()
    for v, text in zip(vals, labels):   # each label reads as its value
        assert lrs.min() - 1e-12 <= v <= lrs.max() + 1e-12
        assert float(text) == pytest.approx(v, abs=span * 1e-3)


def test_distinct_ticks_edge_cases():
    assert distinct_ticks(float("nan"), 1.0) == ([], [])
    assert distinct_ticks(3e-3, 3e-3) == ([3e-3], ["3.00e-3"])      # a constant learning rate
    vals, labels = distinct_ticks(0.0, 3e-3)
    assert labels[0] == "0" and len(set(labels)) == len(labels)
    for lo, hi in ((-1.0, 1.0), (0.2, 0.95), (1e4, 3e4), (2.99e-3, 3e-3)):  # labels say the value
        vals, labels = distinct_ticks(lo, hi)
        assert [float(t) for t in labels] == pytest.approx(vals, rel=1e-9, abs=1e-15), labels


def test_training_figure_lr_axis_uses_the_distinct_ticks():
    lrs = cosine_lrs()[:20]
    rows = [{"event": "step", "step": i + 1, "loss": 1.0, "lr": v} for i, v in enumerate(lrs)]
    fig = training_figure({"run": rows})
    axis = fig.get_subplot(1, 3).yaxis
    assert axis.tickmode == "array" and len(set(axis.ticktext)) == len(axis.ticktext) >= 2
    assert min(axis.tickvals) >= lrs.min() - 1e-12 and max(axis.tickvals) <= lrs.max() + 1e-12


def states(n=40, seed=0):
    rng = np.random.default_rng(seed)
    lrs = cosine_lrs(steps=n)
    tps = rng.uniform(100, 300, n)
    rss = 650 + np.cumsum(rng.normal(0, 8, n))          # jagged samples
    return [TrainState(event="step", step=i + 1, max_steps=n, loss=float(2 - i / n), lr=float(lrs[i]),
                       tokens_per_s=float(tps[i]), rss_mb=float(rss[i])) for i in range(n)], tps, rss


def test_dashboard_draws_smoothed_throughput_peak_memory_and_distinct_lr_ticks():
    dash = TrainingDashboard(redraw_every_s=0.0, smoothing=0.8)
    steps, tps, rss = states()
    dash.on_begin(TrainState(event="begin", step=0, max_steps=len(steps), run="a"), Control())
    for s in steps:
        dash.on_step(s, None)
    dash.on_end(TrainState(event="end", step=len(steps), max_steps=len(steps)), None)
    data = {name: trace for name, trace in zip(TRACES, dash.figure.data)}
    np.testing.assert_allclose(data["tokens/s"].y, tps)
    np.testing.assert_allclose(data["tokens/s (smoothed)"].y, hand_ema(tps, 0.8))
    peak = [max(rss[:t + 1]) for t in range(len(rss))]   # the running max, by brute force
    np.testing.assert_allclose(data["memory"].y, peak)
    assert "peak RSS" in data["memory"].name and "EMA 0.8" in data["tokens/s (smoothed)"].name
    axis = dash.figure.get_subplot(1, 3).yaxis
    assert len(set(axis.ticktext)) == len(axis.ticktext) >= 2
    # the history view of the same run (reports, a rebuilt figure) draws the same curves
    full = run_arrays(dash.runs["a"])
    np.testing.assert_allclose(full["memory"], peak)
    dash.smoothing.value = 0.5                           # the slider smooths throughput too
    smoothed = dash.figure.data[TRACES.index("tokens/s (smoothed)")].y
    np.testing.assert_allclose(smoothed, hand_ema(tps, 0.5))


def test_cuda_memory_is_shown_as_recorded():
    rows = [{"event": "step", "step": i, "loss": 1.0, "rss_mb": 900.0 - i,
             "cuda_allocated_mb": 100.0 + (i % 2), "cuda_reserved_mb": 200.0} for i in (1, 2, 3)]
    fig = training_figure({"gpu": rows})
    data = {name: trace for name, trace in zip(TRACES, fig.data)}
    np.testing.assert_allclose(data["memory"].y, [101, 100, 101])
    np.testing.assert_allclose(data["memory reserved"].y, [200, 200, 200])
    assert "CUDA allocated" in data["memory"].name and "CUDA reserved" in data["memory reserved"].name
