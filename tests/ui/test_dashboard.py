"""TrainingDashboard: the figure holds the logged points, buttons reach a running loop, runs overlay.

The last test runs a real kernel (jupyter_client, no browser): a cell trains with the dashboard,
the client clicks Stop over the shell channel while the cell is busy, exactly as a front end does,
and a second queued cell ("Run All") must run only after the training cell.
"""

from __future__ import annotations

import textwrap
import threading
import time

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

import lora_lab as ll
from lora_lab.train.loop import train
from lora_lab.ui.dashboard import TrainingDashboard, pump_kernel_events
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
    seen = threading.Event()

    class Watch:
        def on_step(self, state, control):
            if state.step == 2:
                seen.set()
                time.sleep(0.5)  # the click lands while this step's callbacks run

    def click():
        seen.wait(60)
        dash.stop_button.click()

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

    class Press:
        def on_step(self, state, control):
            if state.step == 1:
                dash.save_button.click()
                dash.pause_button.value = True
                threading.Timer(0.3, lambda: setattr(dash.pause_button, "value", False)).start()

    res = train(model, tok, tokenized(tok), spec=spec(tmp_path, steps=3), callbacks=[Press(), dash])
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


def test_pump_is_a_no_op_outside_a_kernel():
    assert pump_kernel_events() == 0


KERNEL_CELL = """
import os
os.environ["HF_HUB_OFFLINE"] = "1"
import torch, lora_lab as ll
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from lora_lab.hf.model.builtin import TOKENIZER_DIR
from lora_lab.hf.adapters.attach import attach
from lora_lab.train.loop import train
from lora_lab.ui.dashboard import TrainingDashboard
tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2, pad_token_id=tok.pad_token_id)
model = attach(LlamaForCausalLM(cfg), ll.AdapterSpec(r=2))
ids = tok("abcabcabcabc")["input_ids"]
rows = [{"input_ids": ids, "labels": ids}] * 4
dash = TrainingDashboard()
display(dash)
class Announce:
    def on_step(self, state, control):
        if state.step == 3:
            print("STOP_ID", dash.stop_button.model_id, flush=True)
res = train(model, tok, rows, spec=ll.TrainSpec(steps=3000, batch_size=4, output_dir=OUT),
            callbacks=[Announce(), dash])
print("RESULT", res.stop_reason, res.steps, flush=True)
"""


@pytest.mark.slow
def test_stop_button_in_a_real_busy_kernel(tmp_path):
    """A front end's click (a comm_msg on the shell channel) stops a cell that is busy training,
    and a cell queued behind it runs afterwards, in order."""
    jc = pytest.importorskip("jupyter_client.manager")
    km, kc = jc.start_new_kernel(kernel_name="python3", startup_timeout=120)
    try:
        first = kc.execute(f"OUT = {str(tmp_path / 'run')!r}\n" + textwrap.dedent(KERNEL_CELL))
        # two more cells queued behind it, as by Run All; the third reads a ContextVar the second
        # sets, which holds only if the deferred cells run in the kernel's persistent context
        second = kc.execute("import contextvars\nCV = contextvars.ContextVar('cv')\n"
                            "CV.set('second')\nprint('SECOND', flush=True)")
        third = kc.execute("print('THIRD', CV.get('lost'), flush=True)")
        cells = {first, second, third}
        out, clicked, idle, deadline = [], False, set(), time.time() + 240
        click_id, click_idle = None, False
        while idle != cells and time.time() < deadline:
            msg = kc.get_iopub_msg(timeout=deadline - time.time())
            parent = msg["parent_header"].get("msg_id")
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                out.append(content["text"])
                if content["text"].startswith("STOP_ID") and not clicked:
                    comm_id = content["text"].split()[1]
                    click = kc.session.msg("comm_msg", {
                        "comm_id": comm_id, "data": {"method": "custom",
                                                     "content": {"event": "click"}}})
                    kc.shell_channel.send(click)
                    click_id, clicked = click["header"]["msg_id"], True
            elif kind == "error":
                out.append("ERROR " + content["ename"] + ": " + content["evalue"])
            elif kind == "status" and content["execution_state"] == "idle" and parent in cells:
                idle.add(parent)
            elif kind == "status" and content["execution_state"] == "idle" and parent == click_id:
                click_idle = True
        text = "".join(out)
        assert clicked, text
        # ipywidgets' front end sends a widget's next message only after this one's "idle":
        # without it a second click (Resume after Pause) would never reach the busy kernel
        assert click_idle, "no idle status for the click handled during the busy cell"
        result = [line for line in text.splitlines() if line.startswith("RESULT")]
        assert result and result[0].startswith("RESULT stopped: Stop button"), text
        assert 3 <= int(result[0].split()[-1]) < 3000
        assert text.index("RESULT") < text.index("SECOND") < text.index("THIRD second"), text
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
