"""The Control shared by lora_lab's training loop and the transformers.Trainer bridge.

It lives beside ``specs`` and ``errors`` (no layer of its own) because both ``lora_lab.train`` and
``lora_lab.hf.trainer_callback`` read it, and ``hf`` may not import ``train``.
"""

from __future__ import annotations

import threading

__all__ = ["Control"]


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
