"""Figures for choosing a rank: the rank-cut heatmap behind the RankExplorer, and the rank sweep.

* :class:`CutGrid` — one adapter's spectra laid out once as arrays, so that moving a rank cut k
  costs a column lookup instead of a table rebuild.  With ``E[i, k]`` the energy kept by module i at
  rank k (Σ_{j ≤ k} σ_j² / Σ σ_j², Eckart–Young)::

      energy at k      E[:, k]
      ΔW error at k    √(1 − E[:, k])        (‖ΔW − ΔW_k‖_F / ‖ΔW‖_F)
      parameters at k  Σ_i min(k, r_i) · (out_i + in_i)
      whole adapter    Σ_i E[i, k] ‖ΔW_i‖²_F / Σ_i ‖ΔW_i‖²_F

  and a layers × module-type heatmap whose cells are filled by precomputed indices.
  :func:`lora_lab.viz.spectrum.spectrum_heatmap` draws the same picture from a table (pandas pivot);
  this is the path for live updates (``benchmarks/rank_explorer.py`` compares the two).
* :func:`rank_sweep_figure` — quality, effective rank and parameters against the LoRA rank r, from
  :attr:`lora_lab.train.rank_sweep.RankSweep.table`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .spectrum import METRIC_LABELS

__all__ = ["CutGrid", "diagonal_phi", "rank_sweep_figure"]


@dataclass(frozen=True, eq=False)
class CutGrid:
    """Arrays for a rank cut over every module of one adapter (see the module docstring).

    ``names``: module names (model order).  ``energy``: (modules × (R + 1)) with column k = energy
    kept at rank k (R = the largest r).  ``ranks``, ``widths`` (out + in) and ``frob2`` (‖ΔW‖²_F):
    per module.  ``row_labels`` / ``col_labels``: the heatmap's layers and module types;
    ``rows`` / ``cols``: each module's cell; ``counts``: modules per cell.
    """

    names: tuple
    energy: np.ndarray
    ranks: np.ndarray
    widths: np.ndarray
    frob2: np.ndarray
    row_labels: tuple
    col_labels: tuple
    rows: np.ndarray
    cols: np.ndarray
    counts: np.ndarray

    @classmethod
    def from_spectra(cls, spectra) -> "CutGrid":
        """From an :class:`~lora_lab.hf.spectra.analysis.AdapterSpectra` (its ``spectra``, ``ranks`` and
        ``table``); O(modules · R), done once."""
        table = spectra.table
        names = tuple(table["name"])
        R = max([int(r) for r in table["r"]] + [1])
        energy = np.ones((len(names), R + 1))
        frob2 = np.zeros(len(names))
        for i, name in enumerate(names):
            s = spectra.spectra[name]
            c = np.asarray(s.cumulative_energy, dtype=float)
            energy[i, 0] = 0.0 if s.top > 0 else 1.0
            energy[i, 1:len(c) + 1] = c[:R]
            energy[i, len(c) + 1:] = c[-1] if len(c) else 1.0
            frob2[i] = s.frobenius ** 2
        layers = table["layer"].fillna(-1).astype(int).to_numpy()
        row_labels = tuple(sorted(set(layers.tolist())))
        col_labels = tuple(dict.fromkeys(table["module_type"]))
        rows = np.searchsorted(np.array(row_labels), layers)
        cols = np.array([col_labels.index(t) for t in table["module_type"]], dtype=int)
        counts = np.zeros((len(row_labels), len(col_labels)))
        np.add.at(counts, (rows, cols), 1)
        widths = (table["out"] + table["in"]).to_numpy(int)
        return cls(names, energy, table["r"].to_numpy(int), widths, frob2,
                   tuple(str(r) for r in row_labels), col_labels, rows, cols, counts)

    @property
    def max_rank(self) -> int:
        return self.energy.shape[1] - 1

    def _k(self, k: int) -> int:
        return int(min(max(k, 0), self.max_rank))

    def energy_at(self, k: int) -> np.ndarray:
        """Per module, the share of ‖ΔW‖²_F kept at rank k."""
        return self.energy[:, self._k(k)]

    def error_at(self, k: int) -> np.ndarray:
        """Per module, ‖ΔW − ΔW_k‖_F / ‖ΔW‖_F = √(1 − energy)."""
        return np.sqrt(np.clip(1.0 - self.energy_at(k), 0.0, None))

    def parameters_at(self, k: int) -> int:
        """LoRA parameters after cutting to rank k: Σ min(k, r) · (out + in)."""
        return int((np.minimum(max(k, 0), self.ranks) * self.widths).sum())

    def total_energy_at(self, k: int) -> float:
        """Share of the whole adapter's Σ ‖ΔW_i‖²_F kept at rank k (1.0 for an all-zero adapter)."""
        total = self.frob2.sum()
        return float((self.energy_at(k) * self.frob2).sum() / total) if total > 0 else 1.0

    def grid(self, values) -> np.ndarray:
        """(layers × module types) array of ``values`` (one per module), averaged per cell; NaN
        where no module sits."""
        z = np.zeros(self.counts.shape)
        np.add.at(z, (self.rows, self.cols), np.asarray(values, dtype=float))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.counts > 0, z / np.maximum(self.counts, 1), np.nan)

    def heatmap(self, values, label: str, title: str | None = None) -> go.Figure:
        """The heatmap of ``values``, styled as :func:`~lora_lab.viz.spectrum.spectrum_heatmap`."""
        z = self.grid(values)
        fig = go.Figure(go.Heatmap(
            z=z, x=list(self.col_labels), y=list(self.row_labels), colorscale="Viridis",
            colorbar=dict(title=label), text=np.round(z, 3), texttemplate="%{text}",
            hovertemplate="layer %{y}, %{x}: %{z:.4g}<extra></extra>"))
        fig.update_layout(title=title or label, xaxis_title="module type",
                          yaxis=dict(title="layer", autorange="reversed"),
                          margin=dict(l=60, r=20, t=50, b=50))
        return fig


def diagonal_phi(comparison, names, max_rank: int) -> np.ndarray:
    """(modules × (max_rank + 1)) array: column k holds φ(k, k) of each module, from
    ``comparison.grids`` (k beyond a module's directions uses its last one; NaN for modules the
    comparison lacks, and in column 0)."""
    out = np.full((len(names), max_rank + 1), np.nan)
    for i, name in enumerate(names):
        grid = comparison.grids.get(name)
        if grid is None:
            continue
        g = np.asarray(grid, dtype=float)
        ks = np.arange(1, max_rank + 1)
        out[i, 1:] = g[np.minimum(ks, g.shape[0]) - 1, np.minimum(ks, g.shape[1]) - 1]
    return out


def rank_sweep_figure(table: pd.DataFrame, title: str | None = None) -> go.Figure:
    """Two panels against the LoRA rank r (log₂ axis).

    Left: final train loss and eval loss (left axis), task accuracy when measured (right axis,
    0–1).  Right: the effective rank the trained ΔW actually used (mean and median over modules)
    against the line "effective rank = r", and the trainable parameters (right axis, log).
    """
    t = table.sort_values("rank")
    x = t["rank"].to_numpy(float)
    fig = make_subplots(rows=1, cols=2, specs=[[{"secondary_y": True}, {"secondary_y": True}]],
                        subplot_titles=("quality vs rank", "rank actually used"))

    def col(name):
        return t[name].to_numpy(float) if name in t else np.full(len(t), np.nan)

    fig.add_scatter(x=x, y=col("final_loss"), name="train loss", mode="lines+markers", row=1, col=1)
    fig.add_scatter(x=x, y=col("eval_loss"), name="eval loss", mode="lines+markers", row=1, col=1)
    acc = col("accuracy")
    if np.isfinite(acc).any():
        fig.add_scatter(x=x, y=acc, name="accuracy", mode="lines+markers", row=1, col=1,
                        secondary_y=True, line=dict(dash="dot"))
    fig.add_scatter(x=x, y=col("effective_rank_mean"), name="effective rank (mean)",
                    mode="lines+markers", row=1, col=2)
    fig.add_scatter(x=x, y=col("effective_rank_median"), name="effective rank (median)",
                    mode="lines+markers", row=1, col=2)
    fig.add_scatter(x=x, y=x, name="effective rank = r", mode="lines", row=1, col=2,
                    line=dict(color="grey", dash="dash"))
    fig.add_scatter(x=x, y=col("trainable_params"), name="trainable parameters",
                    mode="lines+markers", row=1, col=2, secondary_y=True,
                    line=dict(color="black", dash="dot"))
    ticks = dict(type="log", tickvals=x, ticktext=[str(int(v)) for v in x], title="rank r")
    fig.update_xaxes(**ticks)
    fig.update_yaxes(title_text="loss", row=1, col=1, secondary_y=False)
    fig.update_yaxes(title_text="accuracy", range=[0, 1.02], row=1, col=1, secondary_y=True)
    fig.update_yaxes(title_text=METRIC_LABELS["effective_rank"], row=1, col=2, secondary_y=False)
    fig.update_yaxes(title_text="parameters", type="log", row=1, col=2, secondary_y=True)
    fig.update_layout(title=title or "rank sweep", legend=dict(orientation="h", y=-0.25),
                      height=420)
    return fig
