"""tokens/s is the step's own (issue 23, item 5): evaluations, saves and callbacks between steps are
not in it, and supervised tokens/s is reported beside it.

Oracle: wall-clock sleeps in ``on_eval`` and ``on_save`` (0.6 s each, far longer than a tiny step).
A step's time is its tokens over its tokens/s; it must stay below the sleep.  The old timer measured
from the end of the previous step, so the step after an evaluation took > 0.6 s (see the message).
Supervised tokens/s divided by tokens/s must be the step's supervised share, counted here from the
rows (labels ≠ -100 after the shift).
"""

from __future__ import annotations

import time

import pytest

import lora_lab as ll
from lora_lab.control import TrainState
from lora_lab.train.loop import train

SLEEP = 0.6
RESPONSES = (1, 3, 8, 12)


def _rows(tok) -> list[dict]:
    rows = []
    for i, n in enumerate(RESPONSES):
        prompt = tok(f"prompt number {i}")["input_ids"]
        response = [10 + i] * n
        rows.append({"input_ids": prompt + response, "labels": [-100] * len(prompt) + response})
    return rows


class _SlowEvalsAndSaves:
    def __init__(self):
        self.steps: list[TrainState] = []

    def on_step(self, state, control):
        self.steps.append(state)

    def on_eval(self, state, control):
        time.sleep(SLEEP)

    def on_save(self, state, control):
        time.sleep(SLEEP)


def test_step_throughput_excludes_evals_and_saves(tiny_llama_dir, tmp_path, one_thread):
    model, tok = ll.load_model(tiny_llama_dir, device="cpu")
    model = ll.attach(model, ll.AdapterSpec(r=2, target_modules="attention-qv"))
    rows = _rows(tok)
    rec = _SlowEvalsAndSaves()
    spec = ll.TrainSpec(steps=6, batch_size=4, lr=1e-3, eval_every=2, save_every=3,
                        output_dir=str(tmp_path / "r"))
    res = train(model, tok, rows, rows[:2], spec=spec, callbacks=[rec])
    n_tokens = sum(len(r["input_ids"]) for r in rows)  # every step holds all 4 rows
    n_sup = sum(RESPONSES)  # the prompt is masked, so the shift drops no supervised label
    step_s = [n_tokens / s.tokens_per_s for s in rec.steps]
    assert [s.tokens for s in rec.steps] == [n_tokens * k for k in range(1, 7)]
    assert max(step_s) < SLEEP / 2, f"step seconds {[round(t, 3) for t in step_s]} (sleep {SLEEP})"
    for s in rec.steps:
        assert s.supervised_tokens_per_s == pytest.approx(s.tokens_per_s * n_sup / n_tokens, rel=1e-9)
    hist = res.history[res.history.event == "step"]
    assert hist.supervised_tokens_per_s.tolist() == [s.supervised_tokens_per_s for s in rec.steps]
    # the run's figures: tokens over the time inside steps (the sleeps took > 3 s of the run)
    assert res.final["elapsed_s"] > 5 * SLEEP
    assert res.final["tokens_per_s"] > 6 * n_tokens / (SLEEP / 2)
    assert res.final["supervised_tokens_per_s"] == pytest.approx(
        res.final["tokens_per_s"] * n_sup / n_tokens, rel=1e-9)


def test_cli_progress_line_names_both_counts(capsys):
    from lora_lab.cli import _Progress

    _Progress(every=1).on_step(TrainState(event="step", step=3, max_steps=10, loss=1.25,
                                          tokens_per_s=4012.0, supervised_tokens_per_s=1203.0,
                                          eta_s=2.0), None)
    line = capsys.readouterr().out
    assert "4,012 tokens/s (1,203 supervised)" in line and "loss  1.2500" in line


def test_trainer_bridge_times_steps_alone():
    """Under ``transformers.Trainer`` the bridge times ``on_step_begin`` → ``on_step_end``; the
    Trainer evaluates and saves after ``on_step_end``, outside that window."""
    from types import SimpleNamespace

    from lora_lab.hf.training.trainer_callback import LiveCallback

    seen = []

    class Rec:
        def on_step(self, state, control):
            seen.append(state.tokens_per_s)

    cb = LiveCallback(Rec())
    args = SimpleNamespace(run_name="t", output_dir="/tmp")
    state = SimpleNamespace(global_step=0, max_steps=2, epoch=0.0, num_input_tokens_seen=0)
    control = SimpleNamespace(should_training_stop=False, should_save=False)
    cb.on_train_begin(args, state, control)
    cb.on_step_begin(args, state, control)
    time.sleep(0.05)  # the step
    state.global_step, state.num_input_tokens_seen = 1, 1000
    cb.on_step_end(args, state, control)
    time.sleep(SLEEP)  # an evaluation and a save, after on_step_end
    cb.on_log(args, state, control, logs={"loss": 1.0})
    assert 1000 / SLEEP < seen[0] <= 1000 / 0.05
