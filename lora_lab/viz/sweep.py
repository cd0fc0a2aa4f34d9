"""Figures for choosing a rank: the rank-cut heatmap behind the RankExplorer, and the rank sweep.

* :func:`cut_heatmap` — a layers × module-type heatmap of one value per module, drawn from a
  :class:`~lora_lab.core.rank_cut.CutGrid` (one adapter's spectra laid out once as arrays, so that
  moving a rank cut k costs a column lookup instead of a table rebuild; the formulas for energy,
  ΔW error and parameters at k are in :mod:`lora_lab.core.rank_cut`).  Its cells are filled by
  precomputed indices.  :func:`lora_lab.viz.spectrum.spectrum_heatmap` draws the same picture from
  a table (pandas pivot); this is the path for live updates (``benchmarks/rank_explorer.py``
  compares the two).
* :func:`rank_sweep_figure` — quality, effective rank and parameters against the LoRA rank r, from
  :attr:`lora_lab.train.rank_sweep.RankSweep.table`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..core.rank_cut import CutGrid
from .spectrum import METRIC_LABELS

__all__ = ["cut_heatmap", "rank_sweep_figure"]


def cut_heatmap(cut: CutGrid, values, label: str, title: str | None = None) -> go.Figure:
    """Heatmap of ``values`` (one per module of ``cut``, e.g. ``cut.energy_at(k)``) on the layers ×
    module-type grid, averaged per cell (:meth:`~lora_lab.core.rank_cut.CutGrid.grid`), styled as
    :func:`~lora_lab.viz.spectrum.spectrum_heatmap`.  One trace: ``z`` (layers × module types),
    ``x`` the module types, ``y`` the layers (top to bottom), ``text`` z rounded to 3 decimals; a
    live update only needs to replace ``z`` and ``text``."""
    z = cut.grid(values)
    fig = go.Figure(go.Heatmap(
        z=z, x=list(cut.col_labels), y=list(cut.row_labels), colorscale="Viridis",
        colorbar=dict(title=label), text=np.round(z, 3), texttemplate="%{text}",
        hovertemplate="layer %{y}, %{x}: %{z:.4g}<extra></extra>"))
    fig.update_layout(title=title or label, xaxis_title="module type",
                      yaxis=dict(title="layer", autorange="reversed"),
                      margin=dict(l=60, r=20, t=50, b=50))
    return fig


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
