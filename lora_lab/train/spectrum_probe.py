"""A training callback that snapshots the adapter's singular spectra every N steps.

Watch the effective rank of ΔW = s·B·A grow while the adapter trains: it starts at 0 (peft sets
B = 0, so ΔW = 0) and rises as directions are learned; the LoRA paper (§7) finds that a few of them
carry most of the update.  Each snapshot is :func:`lora_lab.hf.spectra.analysis.adapter_spectra`, which
works from the factors in O((out + in) · r²) per module: well under a millisecond per module for
LLM shapes, so snapshots every few dozen steps cost a negligible share of training (``overhead_s``
says how much it really took)::

    probe = SpectrumProbe(model, every=10)
    lora_lab.train(model, tok, data, spec=spec, callbacks=[probe])
    probe.frame()                      # step × module: effective rank, stable rank, σ₁, k90, k99
    spectrum_evolution_figure(probe.evolution("model.layers.0.self_attn.q_proj"))
"""

from __future__ import annotations

import threading
import time

import pandas as pd
from torch import nn

from ..errors import LoraLabError
from ..hf.spectra.analysis import AdapterSpectra, adapter_spectra
from .events import Callback, Control, TrainState

__all__ = ["SpectrumProbe"]


class SpectrumProbe(Callback):
    """Snapshot ``adapter_spectra(model, adapter)`` at ``begin``, every ``every`` steps, and ``end``.

    ``snapshots``: list of ``(step, AdapterSpectra)`` in step order (one per step at most).
    The model is read, never changed.  Safe to read from another thread while training runs.
    """

    def __init__(self, model: nn.Module, every: int = 10, adapter: str | None = None):
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise LoraLabError(f"SpectrumProbe every={every!r} is not a step interval.",
                               "pass every=10 (any integer >= 1)")
        self.model, self.every, self.adapter = model, every, adapter
        self.snapshots: list[tuple[int, AdapterSpectra]] = []
        self.overhead_s = 0.0
        self._lock = threading.Lock()

    # -- events --------------------------------------------------------------------------------
    def snapshot(self, step: int) -> None:
        """Take one snapshot now, labelled ``step`` (skipped if that step is already there)."""
        with self._lock:
            if self.snapshots and self.snapshots[-1][0] == step:
                return
        t0 = time.perf_counter()
        spectra = adapter_spectra(self.model, self.adapter)
        with self._lock:
            self.snapshots.append((step, spectra))
            self.overhead_s += time.perf_counter() - t0

    def on_begin(self, state: TrainState, control: Control) -> None:
        self.snapshot(state.step)

    def on_step(self, state: TrainState, control: Control) -> None:
        if state.step % self.every == 0:
            self.snapshot(state.step)

    def on_end(self, state: TrainState, control: Control) -> None:
        self.snapshot(state.step)

    # -- views ---------------------------------------------------------------------------------
    @property
    def steps(self) -> list[int]:
        with self._lock:
            return [s for s, _ in self.snapshots]

    def evolution(self, name: str) -> list:
        """``[(step, Spectrum)]`` of module ``name``, for ``spectrum_evolution_figure``."""
        with self._lock:
            snaps = list(self.snapshots)
        if snaps and name not in snaps[-1][1].spectra:
            raise LoraLabError(f"SpectrumProbe has no module named {name!r}.",
                               f"pass one of {list(snaps[-1][1].spectra)[:6]} ...")
        return [(step, s.spectra[name]) for step, s in snaps if name in s.spectra]

    def frame(self) -> pd.DataFrame:
        """One row per (step, module): the columns of ``AdapterSpectra.table`` plus ``step``."""
        with self._lock:
            snaps = list(self.snapshots)
        if not snaps:
            return pd.DataFrame(columns=["step"])
        return pd.concat([s.table.assign(step=step) for step, s in snaps], ignore_index=True)

    def __repr__(self) -> str:
        steps = self.steps
        span = f"steps {steps[0]}..{steps[-1]}" if steps else "no snapshots yet"
        return (f"SpectrumProbe(every={self.every}, {len(steps)} snapshots, {span}, "
                f"overhead {self.overhead_s:.3f} s)")
