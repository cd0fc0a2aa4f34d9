"""lora_lab.train on a tiny Llama: loss falls, and every way out saves the adapter."""

from __future__ import annotations

import math
import threading

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import lora_lab as ll
from lora_lab.errors import LoraLabError, TrainingError
from lora_lab.train.checkpoint import load_training_state
from lora_lab.train.loop import train  # ll.train: see test_public_name


def adapter_params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def spec(tmp_path, **kw) -> ll.TrainSpec:
    base = dict(steps=8, batch_size=4, lr=5e-3, schedule="constant", output_dir=str(tmp_path / "run"))
    return ll.TrainSpec(**{**base, **kw})


class OnStep:
    """A callback that runs ``fn(state, control)`` at step ``at``."""

    def __init__(self, at, fn):
        self.at, self.fn, self.seen = at, fn, []

    def on_step(self, state, control):
        self.seen.append(state)
        if state.step == self.at:
            self.fn(state, control)


def test_loss_falls_and_the_adapter_is_saved(lora_tiny, rows, tmp_path):
    model, tok = lora_tiny
    res = train(model, tok, rows, spec=spec(tmp_path, steps=10, lr=1e-2))
    loss = res.loss.to_numpy()
    assert res.stop_reason == "completed" and res.steps == 10 and len(loss) == 10
    # a random tiny base bounds the logits (RMSNorm, small lm_head): ~3.4 nats is the floor here
    assert loss[-3:].mean() < loss[0] - 0.5, loss
    # the saved adapter (peft format, safetensors) holds exactly the trained weights
    saved = load_file(f"{res.adapter_path}/adapter_model.safetensors")
    params = adapter_params(model)
    assert len(saved) == len(params) > 0
    for name, t in saved.items():
        match = [p for n, p in params.items() if n.replace(".default", "") == name]
        assert len(match) == 1 and torch.equal(match[0], t), name
    assert res.history.step.is_monotonic_increasing
    written = pd.read_csv(tmp_path / "run" / "history.csv")  # written without pandas
    pd.testing.assert_frame_equal(written, res.history.astype(written.dtypes.to_dict()),
                                  check_exact=False, rtol=1e-12)


def test_stop_from_a_callback_halts_within_one_step_and_saves(lora_tiny, rows, tmp_path):
    model, tok = lora_tiny
    stopper = OnStep(3, lambda s, c: c.stop("enough"))
    res = train(model, tok, rows, spec=spec(tmp_path), callbacks=[stopper])
    assert res.steps == 3 and res.stop_reason == "stopped: enough"
    assert [s.step for s in stopper.seen] == [1, 2, 3]
    state = load_training_state(res.adapter_path)
    assert state["step"] == 3
    for name, p in adapter_params(model).items():
        assert torch.equal(state["trainable"][name], p)


def _hook_at_call(model, n_call: int, fn):
    """Run ``fn(output)`` on the lm_head output at its ``n_call``-th training forward."""
    calls = {"n": 0}

    def hook(module, inputs, output):
        if module.training:
            calls["n"] += 1
            if calls["n"] == n_call:
                return fn(output)
        return output

    return model.get_output_embeddings().register_forward_hook(hook)


def test_nan_loss_halts_naming_the_step_and_keeps_the_last_good_adapter(lora_tiny, rows, tmp_path):
    model, tok = lora_tiny
    snapshots = {}
    recorder = OnStep(-1, None)
    recorder.on_step = lambda s, c: snapshots.__setitem__(s.step, adapter_params(model))
    _hook_at_call(model, 4, lambda out: out * float("nan"))  # the 4th step's forward
    with pytest.raises(TrainingError, match="step 4") as err:
        train(model, tok, rows, spec=spec(tmp_path, lr=5e-2), callbacks=[recorder])
    assert "checkpoint-000003" in str(err.value)
    state = load_training_state(tmp_path / "run")
    assert state["step"] == 3 and state["reason"] == "non-finite"
    for name, p in snapshots[3].items():
        assert torch.equal(state["trainable"][name], p)
        assert not torch.equal(snapshots[2][name], p) or "lora_A" in name  # it did train
    saved = load_file(tmp_path / "run" / "checkpoint-000003" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())


def test_keyboard_interrupt_mid_step_saves_and_returns(lora_tiny, rows, tmp_path):
    model, tok = lora_tiny

    def interrupt(out):
        raise KeyboardInterrupt

    _hook_at_call(model, 3, interrupt)
    res = train(model, tok, rows, spec=spec(tmp_path))
    assert res.stop_reason == "interrupted" and res.steps == 2
    state = load_training_state(res.adapter_path)
    assert state["step"] == 2
    for name, p in adapter_params(model).items():
        assert torch.equal(state["trainable"][name], p)


def test_an_exception_in_a_step_saves_then_propagates(lora_tiny, rows, tmp_path):
    model, tok = lora_tiny

    def boom(out):
        raise RuntimeError("boom in forward")

    _hook_at_call(model, 2, boom)
    with pytest.raises(RuntimeError, match="boom") as err:
        train(model, tok, rows, spec=spec(tmp_path))
    assert any("checkpoint-000001" in n for n in getattr(err.value, "__notes__", []))
    assert load_training_state(tmp_path / "run")["reason"] == "error"


def test_resume_continues_the_step_count_and_the_loss_curve(fresh_lora, tiny_llama, tmp_path):
    tok = tiny_llama[1]
    from conftest import token_rows  # noqa: E402  (tests/train/conftest.py)

    data = token_rows(tok)
    s = spec(tmp_path, steps=6, schedule="cosine", warmup_steps=2)
    model, _ = fresh_lora()
    full = train(model, tok, data, spec=s.replace(output_dir=str(tmp_path / "full")))
    model, _ = fresh_lora()
    part = train(model, tok, data, spec=s, callbacks=[OnStep(3, lambda st, c: c.stop())])
    assert part.steps == 3
    model, _ = fresh_lora()
    rest = train(model, tok, data, spec=s, resume_from=tmp_path / "run")
    assert rest.steps == 6 and list(rest.loss.index) == [1, 2, 3, 4, 5, 6]
    torch.testing.assert_close(torch.tensor(rest.loss.to_numpy()),
                               torch.tensor(full.loss.to_numpy()), rtol=1e-5, atol=1e-6)
    lr = rest.history[rest.history.event == "step"].lr.to_numpy()
    torch.testing.assert_close(torch.tensor(lr), torch.tensor(
        full.history[full.history.event == "step"].lr.to_numpy()))


def test_pause_resume_and_save_now(lora_tiny, rows, tmp_path):
    model, tok = lora_tiny
    waits = []

    class Buttons:
        def on_step(self, state, control):
            if state.step == 2:
                control.save_now()
                control.pause()
                threading.Timer(0.3, control.resume).start()

        def on_wait(self, state, control):
            waits.append(state.step)

    res = train(model, tok, rows, spec=spec(tmp_path, steps=4), callbacks=[Buttons()])
    assert res.stop_reason == "completed" and res.steps == 4
    assert waits and set(waits) == {2}
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == [
        "checkpoint-000002", "checkpoint-000004"]


def test_eval_split_of_prepared_data_is_used(lora_tiny, tmp_path):
    model, tok = lora_tiny
    raw = [{"prompt": f"copy {w}", "response": w} for w in ["abc", "lora", "rank", "tiny"] * 5]
    res = train(model, tok, raw, spec=spec(tmp_path, steps=4, eval_every=2))
    ev = res.history[res.history.event == "eval"]
    assert list(ev.step) == [2, 4] and ev.eval_loss.map(math.isfinite).all()
    assert res.final["eval_loss"] == ev.eval_loss.iloc[-1]


def test_schedule_oracle():
    from lora_lab.train.optim import lr_factor

    s = ll.TrainSpec(steps=10, warmup_steps=2, schedule="cosine")
    assert [lr_factor(i, 10, s) for i in (0, 1)] == [0.0, 0.5]  # transformers': test_schedule.py
    assert lr_factor(2, 10, s) == 1.0 and abs(lr_factor(6, 10, s) - 0.5) < 1e-12
    lin = s.replace(schedule="linear", warmup_steps=0)
    assert [lr_factor(i, 10, lin) for i in (0, 5)] == [1.0, 0.5]


def test_cpu_refuses_gpu_only_choices(lora_tiny, rows, tmp_path):
    model, tok = lora_tiny
    for bad in (dict(optimizer="adamw_8bit"), dict(optimizer="paged_adamw"), dict(precision="fp16")):
        with pytest.raises(LoraLabError, match="CUDA|GPU"):
            train(model, tok, rows, spec=spec(tmp_path, **bad))


def test_model_without_trainable_parameters_is_refused(tiny_llama, rows, tmp_path):
    model, tok = tiny_llama
    model.requires_grad_(False)
    with pytest.raises(TrainingError, match="attach"):
        train(model, tok, rows, spec=spec(tmp_path))


def test_public_name_is_the_function():
    """``lora_lab.train`` must be the function, although ``lora_lab.train`` is also a subpackage."""
    import lora_lab.train.events  # noqa: F401  (importing a submodule must not shadow the name)

    assert ll.train is train
