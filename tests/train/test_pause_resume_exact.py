"""Nothing trained is lost: a paused run, and a run stopped and resumed from its checkpoint, end with
exactly the weights of the uninterrupted run (``torch.equal`` on every trainable tensor).

The oracle is the same training run without the interruption.  The adapter has dropout, and the
schedule warms up and decays, so a lost RNG state, optimizer moment or learning-rate step would
show in the weights, not only in the losses.
"""

from __future__ import annotations

import threading

import torch

import lora_lab as ll
from lora_lab.train.loop import train

ADAPTER = ll.AdapterSpec(r=4, dropout=0.1, target_modules="all-linear")


def _model(model_dir):
    model, _ = ll.load_model(model_dir, device="cpu")
    torch.manual_seed(0)
    return ll.attach(model, ADAPTER)


def _spec(out, **kw):
    return ll.TrainSpec(**{**dict(steps=6, batch_size=4, lr=5e-3, schedule="cosine", warmup_steps=2,
                                  output_dir=str(out)), **kw})


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same_weights(got: dict, want: dict, start: dict) -> None:
    assert got.keys() == want.keys() and len(want) > 0
    for name, t in want.items():
        assert torch.equal(got[name], t), f"{name} differs from the uninterrupted run"
    # and training did move them (lora_A is random at init, lora_B zero: both must have changed)
    assert all(not torch.equal(want[n], start[n]) for n in want)


class _At:
    """Calls ``fn(control)`` once, at step ``step``; counts ``wait`` events."""

    def __init__(self, step, fn):
        self.step, self.fn, self.waits = step, fn, 0

    def on_step(self, state, control):
        if state.step == self.step:
            self.fn(control)

    def on_wait(self, state, control):
        self.waits += 1


def test_pause_loses_nothing(tiny_llama_dir, rows, tmp_path, one_thread):
    tok = ll.load_model(tiny_llama_dir, device="cpu")[1]
    model = _model(tiny_llama_dir)
    start = _trainable(model)
    full = train(model, tok, rows, spec=_spec(tmp_path / "full"))
    want = _trainable(model)

    def pause(control):
        control.pause()
        threading.Timer(0.3, control.resume).start()

    model = _model(tiny_llama_dir)
    assert all(torch.equal(p, start[n]) for n, p in _trainable(model).items())  # same start
    button = _At(3, pause)
    paused = train(model, tok, rows, spec=_spec(tmp_path / "paused"), callbacks=[button])
    assert button.waits > 0, "the run never paused: the test would prove nothing"
    assert paused.stop_reason == full.stop_reason == "completed" and paused.steps == 6
    assert paused.loss.tolist() == full.loss.tolist()
    _assert_same_weights(_trainable(model), want, start)


def test_resume_from_a_checkpoint_ends_with_the_uninterrupted_weights(tiny_llama_dir, rows, tmp_path,
                                                                       one_thread):
    tok = ll.load_model(tiny_llama_dir, device="cpu")[1]
    model = _model(tiny_llama_dir)
    start = _trainable(model)
    full = train(model, tok, rows, spec=_spec(tmp_path / "full"))
    want = _trainable(model)

    model = _model(tiny_llama_dir)
    part = train(model, tok, rows, spec=_spec(tmp_path / "run"),
                 callbacks=[_At(3, lambda control: control.stop("test"))])
    assert part.steps == 3 and part.stop_reason != "completed"
    halfway = _trainable(model)
    assert any(not torch.equal(halfway[n], want[n]) for n in want)   # not already at the end

    model = _model(tiny_llama_dir)                  # a fresh process would start here
    rest = train(model, tok, rows, spec=_spec(tmp_path / "run"), resume_from=tmp_path / "run")
    assert rest.stop_reason == "completed" and rest.steps == 6
    assert rest.loss.tolist() == full.loss.tolist()
    _assert_same_weights(_trainable(model), want, start)
