"""``LiveCallback``: lora_lab callbacks (the dashboard, history, ...) under ``transformers.Trainer``.

::

    dash = lora_lab.ui.TrainingDashboard(); display(dash)
    trainer = Trainer(model, args, train_dataset=..., callbacks=[lora_lab.LiveCallback(dash)])
    trainer.train()

It works the same with TRL's ``SFTTrainer`` (a ``Trainer`` subclass).  To train with lora_lab's
chunked loss (one chunk of logits at a time, the same loss and gradients), put
:class:`lora_lab.hf.training.chunked_loss.ChunkedLossMixin` before the Trainer class::

    from lora_lab.hf.training.chunked_loss import ChunkedLossMixin

    class MyTrainer(ChunkedLossMixin, Trainer):
        chunked_loss, loss_chunk_size = "auto", 512     # as in TrainSpec

    trainer = MyTrainer(model, args, train_dataset=..., callbacks=[lora_lab.LiveCallback(dash)])

Trainer events are translated
to lora_lab's (:mod:`lora_lab.train.events`)::

    on_train_begin → begin      on_log (loss) → step      on_log (eval_loss) → eval
    on_save → save              on_train_end → end

and the Control that lora_lab callbacks (and the dashboard's buttons) change is read back after each
log (the Trainer logs after ``on_step_end``) and at every ``on_step_end``: stop →
``should_training_stop``, save now → ``should_save``, pause → wait there (emitting ``wait`` so the
dashboard keeps hearing its Resume button).  Stopping a ``Trainer`` this way saves only if its
``save_strategy`` says so; ``lora_lab.train`` always saves.

tokens/s is the Trainer's ``num_input_tokens_seen`` (set ``include_num_input_tokens_seen``) over the
time spent inside its steps, from ``on_step_begin`` to ``on_step_end``: evaluations and saves, which
the Trainer runs after ``on_step_end``, are left out, as in :class:`lora_lab.train.measure.StepTimer`.
The Trainer does not report supervised tokens, so ``supervised_tokens_per_s`` stays None here.

On a CPU that emulates bf16 (or fp16) matrix products, 30-350x slower than fp32, the run begins with a
warning when ``TrainingArguments(bf16=True)`` (``fp16``) or the model's own weights would multiply in
that dtype (``lora_lab.train`` refuses both; this Trainer is the user's).

This module is in the ``hf`` layer, which may not import ``lora_lab.train``; the state and control
it hands out and the Control it reads are the shared :class:`lora_lab.control.TrainState` and
:class:`lora_lab.control.Control`, the same classes the training loop uses.
"""

from __future__ import annotations

import time

import torch
from transformers import TrainerCallback

from ...control import Control, TrainState
from ..model.kbit import unpack_4bit_weights

__all__ = ["LiveCallback"]


def _rss_mb() -> float | None:
    try:
        import os

        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


class LiveCallback(TrainerCallback):
    """Forward ``Trainer`` events to lora_lab callbacks (e.g. a ``TrainingDashboard``)."""

    def __init__(self, *callbacks, run: str | None = None):
        self.callbacks = list(callbacks)
        self.run_name = run
        self.control = Control()
        self._t0 = 0.0
        self._step_t0: float | None = None
        self._step_s = 0.0  # seconds inside steps since the last logged loss
        self._tokens_last = 0
        self._last: dict = {}

    def _emit(self, event: str, state, **extra) -> None:
        elapsed = time.perf_counter() - self._t0
        done, total = state.global_step, state.max_steps
        eta = elapsed / done * (total - done) if done else None
        mem = {"rss_mb": _rss_mb()}
        if torch.cuda.is_available():
            mem.update(cuda_allocated_mb=torch.cuda.memory_allocated() / 2**20,
                       cuda_reserved_mb=torch.cuda.memory_reserved() / 2**20)
        snap = TrainState(event=event, step=done, max_steps=total, run=self.run_name or "",
                      epoch=float(state.epoch or 0.0), tokens=int(state.num_input_tokens_seen or 0),
                      elapsed_s=elapsed, eta_s=eta, **mem, **{**self._last, **extra})
        for cb in self.callbacks:
            method = getattr(cb, f"on_{event}", None)
            if method is not None:
                method(snap, self.control)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:  # undo an earlier repacking and switch it off for good (hf/model/kbit.py)
            unpack_4bit_weights(model)
            _warn_emulated(args, model)
        self.control = Control()
        self._t0 = time.perf_counter()
        self._step_t0, self._step_s = None, 0.0
        self._tokens_last = int(state.num_input_tokens_seen or 0)
        self._last = {}
        self.run_name = self.run_name or getattr(args, "run_name", None) or "trainer"
        self._emit("begin", state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "eval_loss" in logs:
            self._last["eval_loss"] = float(logs["eval_loss"])
            self._emit("eval", state)
        if "loss" in logs:
            tokens = int(state.num_input_tokens_seen or 0)
            tps = (tokens - self._tokens_last) / self._step_s if tokens and self._step_s else None
            self._step_s, self._tokens_last = 0.0, tokens
            self._last.update(loss=float(logs["loss"]), tokens_per_s=tps,
                              lr=_float(logs.get("learning_rate")),
                              grad_norm=_float(logs.get("grad_norm")))
            self._emit("step", state)
        return self._apply(control)

    def _apply(self, control):
        """Read our Control back into the Trainer's (at step end, and after each log, which the
        Trainer does after ``on_step_end``)."""
        ours = self.control
        if ours.should_stop:
            control.should_training_stop = True
        if ours.take_save_request():
            control.should_save = True
        return control

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._step_t0 is not None:  # before any pause: the step's own time
            self._step_s += time.perf_counter() - self._step_t0
            self._step_t0 = None
        ours = self.control
        while ours.paused and not ours.should_stop:
            self._emit("wait", state)
            ours.wait_for_resume(0.1)
        return self._apply(control)

    def on_save(self, args, state, control, **kwargs):
        path = f"{args.output_dir}/checkpoint-{state.global_step}"
        self._emit("save", state, checkpoint=path)

    def on_train_end(self, args, state, control, **kwargs):
        reason = f"stopped: {self.control.reason}" if self.control.should_stop else "completed"
        self._emit("end", state, stop_reason=reason)


def _warn_emulated(args, model) -> None:
    """Warn when this run would multiply in a 16-bit dtype this CPU emulates, 30-350x slower than fp32
    (hf/model/device.py): ``TrainingArguments(bf16=True)`` (or ``fp16``) there, or a base loaded in
    such a dtype.  ``lora_lab.train`` refuses these; a ``Trainer`` is the user's own, so it warns."""
    import warnings

    from ..model import device as dev

    param = next(model.parameters(), None)
    slow = dev.emulated_dtypes() if param is not None and param.device.type == "cpu" else {}
    asked = [(flag, dtype) for flag, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16))
             if getattr(args, flag, False) and dtype in slow]
    layers = dev.emulated_half_weights(model) if slow and not asked else []
    if asked:
        flag, dtype = asked[0]
        warnings.warn(f"TrainingArguments({flag}=True) on a CPU: {slow[dtype]}. Pass {flag}=False: this "
                      "CPU trains fastest in fp32.", stacklevel=2)
    elif layers:
        name, dtype = layers[0]
        warnings.warn(f"{len(layers)} layers of this model multiply in {dev.dtype_name(dtype)} ({name}, "
                      f"...), and {slow[dtype]}. Load the model with dtype='auto' (fp32 on this CPU).",
                      stacklevel=2)


def _float(x) -> float | None:
    return None if x is None else float(x)
