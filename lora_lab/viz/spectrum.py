"""Figures for the singular spectrum of LoRA updates.  Records in, plotly ``go.Figure`` out.

* :func:`spectrum_figure` — σ_i of one module on a log axis, with the cumulative energy curve.
* :func:`spectrum_heatmap` — layers × module type of one metric (effective rank, k90, energy at k,
  or φ from :func:`lora_lab.hf.spectra.analysis.compare_adapters`).
* :func:`phi_figure` — the φ(i, j) grid of one module between two adapters (LoRA paper fig. 3).
* :func:`spectrum_evolution_figure` — how σ_i and the effective rank move over training steps.

Arrays are passed to plotly as numpy arrays (cheaper to serialise and update than lists).
A spectrum that is not of the plain ΔW = s·B·A carries a note (for DoRA, "DoRA: true ΔW = W' − W
incl. magnitude (full rank)"), and every figure drawn from it puts the note in its title.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ..core.quant import module_order

__all__ = [
    "CELL_TEXT_MAX_CELLS",
    "CELL_TEXT_MAX_ROWS",
    "phi_figure",
    "spectrum_evolution_figure",
    "spectrum_figure",
    "spectrum_heatmap",
    "with_notes",
]

CELL_TEXT_MAX_ROWS = 16
CELL_TEXT_MAX_CELLS = 128
"""A heatmap writes its values in the cells only up to this many rows and cells: at the default
450 px height, 30 layers leave ~10 px per row, less than the text; hover always gives the value."""

METRIC_LABELS = {
    "effective_rank": "effective rank",
    "stable_rank": "stable rank",
    "top_sigma": "σ₁",
    "k90": "k for 90% energy",
    "k99": "k for 99% energy",
    "energy_at_k": "energy kept at rank k",
    "error_at_k": "ΔW relative error at rank k",
    "phi_top": "φ(1, 1)",
    "phi_k": "φ(k, k)",
    "phi_mean": "mean φ",
}


def _np(x) -> np.ndarray:
    return np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, dtype=float)


def with_notes(title: str, notes) -> str:
    """``title`` followed by each note in brackets, unless the title already says it."""
    extra = [n for n in dict.fromkeys(notes) if n and n not in title]
    return title + "".join(f" [{n}]" for n in extra)


def _table_notes(source, frame: pd.DataFrame) -> list:
    """The result's own ``notes`` (AdapterSpectra, AdapterComparison), or from a bare table's
    ``dora`` column."""
    if hasattr(source, "notes"):
        return list(source.notes)
    if "dora" in frame.columns and frame["dora"].fillna(False).astype(bool).any():
        return ["DoRA modules included"]
    return []


def spectrum_figure(spectrum, k: int | None = None, title: str | None = None) -> go.Figure:
    """σ_i (bars, log y) and cumulative energy Σ_{j ≤ i} σ_j² / Σ σ_j² (line, right axis, 0–1).

    ``spectrum``: a :class:`~lora_lab.core.spectrum.Spectrum`.  ``k`` draws a cut at rank k and puts
    the energy kept there in the title.  Zero singular values are left out of the log axis.  The
    spectrum's ``note`` (e.g. DoRA's true ΔW) is always in the title.
    """
    sigma = spectrum.numpy()
    index = np.arange(1, len(sigma) + 1)
    positive = sigma > 0
    fig = go.Figure()
    fig.add_bar(x=index[positive], y=sigma[positive], name="σ_i", marker_color="#4c78a8")
    fig.add_scatter(x=index, y=_np(spectrum.cumulative_energy), name="cumulative energy",
                    mode="lines+markers", yaxis="y2", line={"color": "#f58518"})
    head = title or (spectrum.name or "ΔW spectrum")
    if k is not None:
        fig.add_vline(x=k + 0.5, line_dash="dash", line_color="grey")
        head += f" — rank {k} keeps {spectrum.energy_at(k):.1%} of the energy"
    fig.update_layout(
        title=with_notes(head, [getattr(spectrum, "note", "")]),
        xaxis={"title": "i (singular value index)"},
        yaxis={"title": "σ_i", "type": "log"},
        yaxis2={"title": "energy", "overlaying": "y", "side": "right", "range": [0, 1.05]},
        legend={"orientation": "h", "y": -0.2}, bargap=0.1)
    return fig


def _frame(source) -> pd.DataFrame:
    if isinstance(source, pd.DataFrame):
        return source
    for attr in ("to_frame", "table"):
        if hasattr(source, attr):
            value = getattr(source, attr)
            return value() if callable(value) else value
    raise TypeError(f"expected a DataFrame or a result with .table, got {type(source).__name__}")


def _with_k_metric(source, frame: pd.DataFrame, metric: str, k: int | None) -> pd.DataFrame:
    if metric not in ("energy_at_k", "error_at_k"):
        return frame
    if k is None or not hasattr(source, "energy_at"):
        raise ValueError(f"metric={metric!r} needs k= and an AdapterSpectra (adapter_spectra(model)).")
    series = source.energy_at(k) if metric == "energy_at_k" else source.error_at(k)
    return frame.assign(**{metric: frame["name"].map(series)})


def spectrum_heatmap(source, metric: str = "effective_rank", k: int | None = None,
                     title: str | None = None) -> go.Figure:
    """Heatmap of ``metric`` with decoder layers down and module types across.

    ``source``: an ``AdapterSpectra``, an ``AdapterComparison`` or any DataFrame with ``layer``,
    ``module_type`` and the metric column.  ``metric="energy_at_k"`` / ``"error_at_k"`` need ``k``.
    Layers run in numeric order, module types in the order models list them (q, k, v, o, gate, up,
    down: :func:`lora_lab.core.quant.module_order`, as the quantization heatmap does).  Values are
    written in the cells up to :data:`CELL_TEXT_MAX_ROWS` rows and :data:`CELL_TEXT_MAX_CELLS`
    cells; hover shows them always.
    """
    frame = _with_k_metric(source, _frame(source), metric, k)
    if metric not in frame.columns:
        numeric = [c for c in frame.columns if c not in ("name", "layer", "module_type")]
        raise ValueError(f"metric={metric!r} is not in this table; choose from {numeric}"
                         + (" or 'energy_at_k' / 'error_at_k' with k=" if hasattr(source, "energy_at")
                            else ""))
    frame = frame.assign(layer=frame["layer"].fillna(-1).astype(int))
    grid = frame.pivot_table(index="layer", columns="module_type", values=metric, aggfunc="mean",
                             sort=False).sort_index()
    grid = grid[[c for c in module_order(frame["module_type"]) if c in grid.columns]]
    label = METRIC_LABELS.get(metric, metric) + (f" (k={k})" if k is not None else "")
    z = grid.to_numpy(dtype=float)
    cell_text = z.shape[0] <= CELL_TEXT_MAX_ROWS and z.size <= CELL_TEXT_MAX_CELLS
    fig = go.Figure(go.Heatmap(
        z=z, x=list(grid.columns), y=[str(i) for i in grid.index], colorscale="Viridis",
        colorbar={"title": label}, text=np.round(z, 3) if cell_text else None,
        texttemplate="%{text}" if cell_text else None,
        hovertemplate="layer %{y}, %{x}: %{z:.4g}<extra></extra>"))
    fig.update_layout(title=with_notes(title or label, _table_notes(source, frame)),
                      xaxis_title="module type",
                      yaxis={"title": "layer", "autorange": "reversed"})
    return fig


def phi_figure(grid, title: str | None = None, labels: tuple[str, str] = ("adapter A", "adapter B"),
               ) -> go.Figure:
    """φ(i, j) heatmap for one module between two adapters (LoRA paper §7.2, fig. 3).

    ``grid``: (k_a × k_b) array from ``compare_adapters(...).grids[name]``, or a pair
    ``(comparison, module_name)``.  Rows i = top-i directions of A, columns j of B; scale 0–1.
    """
    if isinstance(grid, tuple):
        comparison, name = grid
        title = title or f"φ — {name}"
        grid = comparison.grids[name]
    z = _np(grid)
    fig = go.Figure(go.Heatmap(
        z=z, x=np.arange(1, z.shape[1] + 1), y=np.arange(1, z.shape[0] + 1), zmin=0, zmax=1,
        colorscale="Viridis", colorbar={"title": "φ"},
        hovertemplate="i=%{y}, j=%{x}: φ=%{z:.3f}<extra></extra>"))
    fig.update_layout(title=title or "subspace similarity φ(i, j)",
                      xaxis_title=f"j ({labels[1]})",
                      yaxis={"title": f"i ({labels[0]})", "autorange": "reversed"})
    return fig


def spectrum_evolution_figure(snapshots, top: int = 8, title: str | None = None) -> go.Figure:
    """σ_1..σ_top over training steps (log y) and the effective rank (right axis).

    ``snapshots``: a sequence of ``(step, Spectrum)`` pairs, e.g. from a spectrum probe.  The
    spectra's notes (e.g. DoRA's true ΔW) go in the title.
    """
    snapshots = sorted(snapshots, key=lambda pair: pair[0])
    steps = np.array([s for s, _ in snapshots], dtype=float)
    n = min([top] + [len(sp) for _, sp in snapshots]) if snapshots else 0
    fig = go.Figure()
    for i in range(n):
        y = np.array([float(sp.values[i]) for _, sp in snapshots])
        fig.add_scatter(x=steps, y=np.where(y > 0, y, np.nan), mode="lines", name=f"σ_{i + 1}")
    fig.add_scatter(x=steps, y=np.array([sp.effective_rank for _, sp in snapshots]),
                    mode="lines+markers", name="effective rank", yaxis="y2",
                    line={"color": "black", "dash": "dot"})
    notes = [getattr(sp, "note", "") for _, sp in snapshots]
    fig.update_layout(title=with_notes(title or "spectrum over training", notes), xaxis_title="step",
                      yaxis={"title": "σ_i", "type": "log"},
                      yaxis2={"title": "effective rank", "overlaying": "y", "side": "right",
                              "rangemode": "tozero"},
                      legend={"orientation": "h", "y": -0.2})
    return fig
