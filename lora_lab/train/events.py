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
from typing import Iterable, Protocol, runtime_checkable

from ..control import Control, TrainState

__all__ = ["EVENTS", "TrainState", "Control", "Callback", "CallbackProtocol", "Autosave", "emit"]

EVENTS = ("begin", "step", "eval", "save", "end", "wait")


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


class Autosave(Callback):
    """Asks for a checkpoint (``control.save_now()``) at the first step that ends ``minutes`` of wall
    time after the start or the last save (``TrainSpec.autosave_minutes``): SIGKILL, the out-of-memory
    killer and a closed Colab leave no handler to save, so this bounds what they can take."""

    def __init__(self, minutes: float):
        self.every_s, self.last = minutes * 60.0, time.monotonic()

    def on_begin(self, state: TrainState, control: Control) -> None:
        self.last = time.monotonic()

    def on_step(self, state: TrainState, control: Control) -> None:
        if time.monotonic() - self.last >= self.every_s:
            control.save_now()

    def on_save(self, state: TrainState, control: Control) -> None:
        self.last = time.monotonic()


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
