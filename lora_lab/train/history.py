"""Metric history: a callback that keeps one row per logged step and per evaluation.

The rows become :attr:`lora_lab.TrainResult.history`, a DataFrame with one row per ``step`` or
``eval`` event::

    event  step  epoch  loss  eval_loss  lr  grad_norm  tokens_per_s  supervised_tokens_per_s
    tokens  elapsed_s  rss_mb ...

``loss`` is the step's token-mean loss (over every supervised token of its micro-batches);
``tokens_per_s`` counts all non-padding tokens of the step, prompts included, and
``supervised_tokens_per_s`` only those the loss is averaged over, both per second of the step's
own time (:class:`lora_lab.train.measure.StepTimer`).

On resume the previous run's rows are passed in (``rows=``), so the curve continues.
"""

from __future__ import annotations

import csv
from typing import TYPE_CHECKING

from .events import Callback, Control, TrainState

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["History", "COLUMNS"]

COLUMNS = ("event", "step", "epoch", "loss", "eval_loss", "lr", "grad_norm", "tokens_per_s",
           "supervised_tokens_per_s", "tokens", "elapsed_s", "rss_mb", "cuda_allocated_mb",
           "cuda_reserved_mb")


class History(Callback):
    """Collect ``step`` and ``eval`` states as rows (plain dicts of numbers)."""

    def __init__(self, rows: list[dict] | None = None):
        self.rows: list[dict] = [dict(r) for r in (rows or [])]

    def _add(self, state: TrainState) -> None:
        rec = state.as_record()
        self.rows.append({k: rec[k] for k in COLUMNS})

    def on_step(self, state: TrainState, control: Control) -> None:
        self._add(state)

    def on_eval(self, state: TrainState, control: Control) -> None:
        self._add(state)

    def write_csv(self, path) -> None:
        """The rows as CSV (header: ``COLUMNS``; an empty field for a missing value), written
        with the standard library so that a run's saves need no pandas."""
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(COLUMNS))
            writer.writeheader()
            writer.writerows(self.rows)

    def frame(self) -> pd.DataFrame:
        import pandas as pd  # here, not at import: 67 MiB of RSS a training run does not need

        return pd.DataFrame(self.rows, columns=list(COLUMNS))
