"""The TrainState and Control shared by lora_lab's training loop and the Trainer bridge.

They live beside ``specs`` and ``errors`` (no layer of their own) because both ``lora_lab.train``
and ``lora_lab.hf.training.trainer_callback`` use them, and ``hf`` may not import ``train``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, fields

__all__ = ["TrainState", "Control"]


@dataclass(frozen=True)
class TrainState:
    """A snapshot of a run, handed to callbacks.  All numbers are plain Python floats/ints.

    ``step`` counts optimizer steps done (0 at ``begin``); ``max_steps`` is the planned total.
    ``loss`` is the last step's training loss, the mean over the supervised tokens of all its
    ``grad_accum`` micro-batches (see :mod:`lora_lab.train.step`); ``eval_loss`` the latest
    evaluation (None before the first).  ``tokens_per_s`` is the throughput of the last step
    (timed alone) in non-padding tokens, prompts included; ``supervised_tokens_per_s`` counts only
    the tokens the loss is averaged over (labels ≠ -100); ``tokens`` is the total of non-padding
    tokens seen.  Memory is CUDA ``allocated``/``reserved`` on a GPU, else the process resident
    set (``rss_mb``).
    ``eta_s`` extrapolates the mean step time over the steps left.  ``loss_kind`` says which loss
    runs: ``"full"`` (the model's own) or ``"chunked (C tokens)"`` (``TrainSpec.chunked_loss``).
    ``precision`` says what the matrix products run in: ``"fp32"``, ``"bf16 autocast"`` or
    ``"fp16 autocast"`` (``TrainSpec.precision``; "auto" picks bf16 autocast on a bf16 CPU or GPU).
    ``compiled``: the decoder layers run through ``torch.compile`` (``TrainSpec.compile``).
    """

    event: str
    step: int
    max_steps: int
    run: str = ""
    epoch: float = 0.0
    loss: float | None = None
    eval_loss: float | None = None
    lr: float | None = None
    grad_norm: float | None = None
    tokens_per_s: float | None = None
    supervised_tokens_per_s: float | None = None
    tokens: int = 0
    elapsed_s: float = 0.0
    eta_s: float | None = None
    rss_mb: float | None = None
    cuda_allocated_mb: float | None = None
    cuda_reserved_mb: float | None = None
    checkpoint: str | None = None
    stop_reason: str | None = None
    loss_kind: str | None = None
    precision: str | None = None
    compiled: bool = False

    def replace(self, **changes) -> "TrainState":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return TrainState(**values)

    def as_record(self) -> dict:
        """The numbers of this state as a flat dict (one row of the history table)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Control:
    """Requests from callbacks and buttons to the loop: stop, pause/resume, save now.

    Thread-safe (``threading.Event``).  The loop polls it between optimizer steps::

        control.stop("loss target reached")   # the loop saves and returns
        control.pause(); control.resume()     # the loop idles between steps, emitting 'wait'
        control.save_now()                    # one extra checkpoint after the current step
    """

    def __init__(self):
        self._stop = threading.Event()
        self._run = threading.Event()
        self._run.set()
        self._save = threading.Event()
        self.reason: str | None = None

    # -- requests (any thread) ----------------------------------------------------------------
    def stop(self, reason: str = "stopped") -> None:
        if not self._stop.is_set():
            self.reason = reason
        self._stop.set()
        self._run.set()  # a paused loop must wake up to stop

    def pause(self) -> None:
        self._run.clear()

    def resume(self) -> None:
        self._run.set()

    def save_now(self) -> None:
        self._save.set()

    # -- what the loop reads ------------------------------------------------------------------
    @property
    def should_stop(self) -> bool:
        return self._stop.is_set()

    @property
    def paused(self) -> bool:
        return not self._run.is_set()

    def take_save_request(self) -> bool:
        """True once per ``save_now()`` call (the request is consumed)."""
        if self._save.is_set():
            self._save.clear()
            return True
        return False

    def wait_for_resume(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds while paused; True when running again."""
        return self._run.wait(timeout)

    def __repr__(self) -> str:
        flags = [n for n, on in (("stop", self.should_stop), ("paused", self.paused),
                                 ("save", self._save.is_set())) if on]
        return f"Control({', '.join(flags) or 'running'})"
