"""Events, the immutable training state, and the one thing a callback may change: a ``Control``.

The loop in :mod:`lora_lab.train.loop` emits five events, in this order::

    begin  →  (step [eval] [save])*  →  end

and, while paused, ``wait`` ticks (about 10 a second) so that a view can keep listening for its
buttons.  Each event calls ``callback.on_<event>(state, control)`` on every callback that has such a
method; a callback may implement any subset (duck typing; :class:`Callback` is a convenient no-op
base class, not a requirement).

* ``state`` is a :class:`TrainState`: a frozen snapshot of step, loss, learning rate, grad norm,
  throughput and memory.  A callback cannot change training through it.
* ``control`` is the run's :class:`Control`: the only channel back into the loop.  ``stop()``,
  ``pause()``/``resume()`` and ``save_now()`` are thread-safe, because a button click may arrive on
  another thread (a kernel subshell, or a worker) while the loop is inside a step.  The loop reads
  the control between optimizer steps, so a stop takes effect within one step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields
from typing import Iterable, Protocol, runtime_checkable

from ..control import Control

__all__ = ["EVENTS", "TrainState", "Control", "Callback", "CallbackProtocol", "emit"]

EVENTS = ("begin", "step", "eval", "save", "end", "wait")


@dataclass(frozen=True)
class TrainState:
    """A snapshot of a run, handed to callbacks.  All numbers are plain Python floats/ints.

    ``step`` counts optimizer steps done (0 at ``begin``); ``max_steps`` is the planned total.
    ``loss`` is the mean training loss of the last step (over its ``grad_accum`` micro-batches),
    ``eval_loss`` the latest evaluation (None before the first).  ``tokens_per_s`` is the
    throughput of the last step in non-padding tokens; ``tokens`` the total seen.  Memory is CUDA
    ``allocated``/``reserved`` on a GPU, else the process resident set (``rss_mb``).
    ``eta_s`` extrapolates the mean step time over the steps left.
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
    tokens: int = 0
    elapsed_s: float = 0.0
    eta_s: float | None = None
    rss_mb: float | None = None
    cuda_allocated_mb: float | None = None
    cuda_reserved_mb: float | None = None
    checkpoint: str | None = None
    stop_reason: str | None = None

    def replace(self, **changes) -> "TrainState":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return TrainState(**values)

    def as_record(self) -> dict:
        """The numbers of this state as a flat dict (one row of the history table)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@runtime_checkable
class CallbackProtocol(Protocol):
    """What the loop calls.  Every method is optional; these are the signatures."""

    def on_begin(self, state: TrainState, control: Control) -> None: ...
    def on_step(self, state: TrainState, control: Control) -> None: ...
    def on_eval(self, state: TrainState, control: Control) -> None: ...
    def on_save(self, state: TrainState, control: Control) -> None: ...
    def on_end(self, state: TrainState, control: Control) -> None: ...
    def on_wait(self, state: TrainState, control: Control) -> None: ...


class Callback:
    """A no-op base class: override the events you need (``on_step``, ``on_eval``, ...)."""

    def on_begin(self, state: TrainState, control: Control) -> None:
        pass

    def on_step(self, state: TrainState, control: Control) -> None:
        pass

    def on_eval(self, state: TrainState, control: Control) -> None:
        pass

    def on_save(self, state: TrainState, control: Control) -> None:
        pass

    def on_end(self, state: TrainState, control: Control) -> None:
        pass

    def on_wait(self, state: TrainState, control: Control) -> None:
        pass


def emit(callbacks: Iterable, event: str, state: TrainState, control: Control) -> None:
    """Call ``on_<event>(state, control)`` on each callback that defines it."""
    name = f"on_{event}"
    for cb in callbacks:
        method = getattr(cb, name, None)
        if method is not None:
            method(state, control)


def wait_while_paused(callbacks, state: TrainState, control: Control, tick_s: float = 0.1) -> float:
    """Idle while ``control`` is paused, emitting ``wait`` every ``tick_s``; return seconds paused.

    The ``wait`` ticks let a view keep hearing its buttons (the Resume click) while the loop idles.
    """
    t0 = time.perf_counter()
    while control.paused and not control.should_stop:
        emit(callbacks, "wait", state, control)
        control.wait_for_resume(tick_s)
    return time.perf_counter() - t0
