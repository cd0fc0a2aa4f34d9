"""What ``lora_lab.train`` returns: :class:`TrainResult`."""

from __future__ import annotations

import functools
import html
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..specs import TrainSpec
from .history import History

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["TrainResult"]


@dataclass(frozen=True, eq=False)
class TrainResult:
    """What a run produced.

    ``history``: a DataFrame with one row per logged step and evaluation (see
    :mod:`lora_lab.train.history`), built from ``rows`` (plain dicts) on first use.
    ``final``: the last loss and eval loss, tokens/s and supervised tokens/s over the time spent in
    training steps (evaluations and saves excluded), elapsed wall seconds, peak memory, ``precision``
    (the matrix products': ``"fp32"``, ``"bf16 autocast"``; hf/model/device.py has "auto"'s rule),
    ``attention`` (``"sdpa fp32"`` when a CPU bf16 run ran it in fp32, else None) and ``compiled``
    (``TrainSpec.compile``).
    ``adapter_path``: the last checkpoint (a peft adapter folder, loadable by ``load_adapter``).
    ``stop_reason``: ``"completed"``, ``"stopped: <why>"``, ``"interrupted"``, ``"non-finite"`` or
    ``"error"``.
    """

    rows: list = field(repr=False)
    final: dict
    adapter_path: str | None
    output_dir: str
    stop_reason: str
    steps: int
    max_steps: int
    spec: TrainSpec = field(repr=False, default=None)

    @functools.cached_property
    def history(self) -> pd.DataFrame:
        """The rows as a DataFrame, built on first use (pandas is not imported while training)."""
        return History(self.rows).frame()

    @property
    def loss(self) -> pd.Series:
        """The training loss per step (index: step)."""
        import pandas as pd

        h = self.history[self.history.event == "step"]
        return pd.Series(h.loss.to_numpy(float), index=h.step.to_numpy(), name="loss")

    def __repr__(self) -> str:
        f = self.final
        loss = f"{f['loss']:.4f}" if f.get("loss") is not None else "-"
        ev = f", eval_loss={f['eval_loss']:.4f}" if f.get("eval_loss") is not None else ""
        return (f"TrainResult({self.stop_reason}, step {self.steps}/{self.max_steps}, loss={loss}"
                f"{ev}, {f.get('tokens_per_s', 0):,.0f} tokens/s, adapter={self.adapter_path!r})")

    def _repr_html_(self) -> str:
        rows = [("stopped", self.stop_reason), ("steps", f"{self.steps} / {self.max_steps}"),
                *((k, f"{v:,.4g}" if isinstance(v, float) else str(v))
                  for k, v in self.final.items()), ("adapter", str(self.adapter_path))]
        body = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th>"
                       f"<td>{html.escape(v)}</td></tr>" for k, v in rows)
        return f"<table><caption>TrainResult</caption>{body}</table>"
