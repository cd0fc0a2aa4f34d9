"""What a switchboard tab may ask of the board that holds it (:class:`Host`), and ``BASE``.

Tabs depend on this Protocol, never on the board's module, so each tab can be read (and tested
with a small stand-in host) on its own."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

__all__ = ["BASE", "Host"]

BASE = "(base)"   # the name shown for "all adapters off": exactly y = W x


class Host(Protocol):
    """The board, as its tabs see it.

    ``model`` is read at each use: loading the first adapter replaces a plain base model by the
    peft model that wraps it.  ``blends`` records how each blended adapter was made (name →
    (weights, combination, density)) so that ``code()`` can rebuild it.
    """

    model: object
    tokenizer: object
    spec: object
    busy: bool
    redraw_every_s: float
    stop_flag: threading.Event
    blends: dict[str, tuple]

    def names(self) -> list[str]:
        """The model's adapters, in load order."""

    def say(self, text: str, error: bool = False) -> None:
        """Show ``text`` under the board (an error in red), or clear the message with ``""``."""

    def safely(self, action: Callable[[], object]) -> None:
        """Run a button's action, showing a refusal as a message instead of a traceback."""

    def guard(self) -> None:
        """Raise :class:`~lora_lab.errors.AdapterError` while a generation runs."""

    def unmerge_first(self) -> str:
        """Undo an in-place merge before the adapters change; returns the note to show ("" if none)."""

    def refresh(self, structure: bool = True) -> None:
        """Make the table and the controls show the model's adapters (all of them after a load,
        delete or blend; only the active and merged marks otherwise)."""

    def launch(self, job: Callable[[], None]) -> None:
        """Run a generation ``job``: on a worker thread inside a kernel, else here; busy meanwhile."""
