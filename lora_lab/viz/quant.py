"""Figures for quantization error: records in (a :class:`~lora_lab.hf.quant.scan.QuantScan`,
:class:`~lora_lab.core.quant.QuantError` list, :class:`~lora_lab.core.lowrank.RecoveryResult`,
:class:`~lora_lab.core.histogram.WeightHistogram`),
plotly ``go.Figure`` out.

* :func:`error_heatmap` — layers × module type, one heatmap per scheme (a dropdown switches).
* :func:`scheme_bars` — NF4 vs FP4 vs int8 (…) per module type, averaged over layers.
* :func:`blocksize_figure` — error against blocksize (one line per scheme).
* :func:`weight_histogram` — one weight's histogram with the NF4 code points, scaled by the
  median block absmax (what the 16 levels look like for a typical block), from a
  :class:`~lora_lab.core.histogram.WeightHistogram`
  (:func:`lora_lab.hf.quant.roundtrip.weight_histogram_data` computes it).
* :func:`recovery_figure` — remaining error against LoRA rank (SVD and LoftQ).

The heatmap and the bars put layers in numeric order and module types in the order models list
them (q, k, v, o, gate, up, down: :func:`lora_lab.core.quant.module_order`, as the spectrum heatmap
does), and carry the scan's caveats (weights already on a 4-bit grid; int8 is LLM.int8(), whose
run-time rounding of inputs a weight scan does not see) under their title.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

from ..core.histogram import WeightHistogram
from ..core.lowrank import RecoveryResult
from ..core.quant import QuantError, module_order

__all__ = [
    "blocksize_figure",
    "error_heatmap",
    "recovery_figure",
    "scheme_bars",
    "weight_histogram",
]

_LABELS = {"rel_error": "relative error ‖W−Q‖/‖W‖", "snr_db": "SNR (dB)",
           "mean_abs_error": "mean |W−Q|", "max_abs_error": "max |W−Q|",
           "outlier_share": "share of |w| > 6σ", "bits_per_param": "bits per parameter"}


def _modules(table) -> list[str]:
    return module_order(table["module"])


def _title(text: str, scan) -> str:
    """``text``, with the scan's caveats (short labels, if any) in small type below it."""
    labels = list(getattr(scan, "caveats", {}) or {})
    return text + "".join(f"<br><sup>{c}</sup>" for c in labels)


def error_heatmap(scan, metric: str = "rel_error", schemes: Sequence[str] | None = None) -> go.Figure:
    """Heatmap of ``metric`` with decoder layers down and module types across, one trace per scheme
    (the first is shown; a dropdown picks another).  Hover gives the tensor name."""
    t = scan.table
    schemes = list(schemes or scan.schemes)
    modules = _modules(t)
    fig = go.Figure()
    for i, s in enumerate(schemes):
        sub = t[t.scheme == s]
        z = sub.pivot_table(index="layer", columns="module", values=metric, aggfunc="mean")
        z = z.reindex(index=sorted(z.index, key=int), columns=modules)       # layers as numbers
        names = sub.pivot_table(index="layer", columns="module", values="name", aggfunc="first")
        names = names.reindex(index=z.index, columns=modules)
        fig.add_trace(go.Heatmap(z=z.to_numpy(dtype=float), x=modules, y=[int(v) for v in z.index],
                                 customdata=names.to_numpy(dtype=object), name=s, visible=i == 0,
                                 colorscale="Viridis", colorbar={"title": metric},
                                 hovertemplate="%{customdata}<br>" + metric + "=%{z:.4g}<extra>"
                                 + s + "</extra>"))
    buttons = [{"label": s, "method": "update",
                "args": [{"visible": [j == i for j in range(len(schemes))]},
                         {"title.text": _title(f"{_LABELS.get(metric, metric)} — {s}", scan)}]}
               for i, s in enumerate(schemes)]
    head = f"{_LABELS.get(metric, metric)} — {schemes[0] if schemes else ''}"
    fig.update_layout(title=_title(head, scan),
                      xaxis_title="module", yaxis_title="layer", yaxis_autorange="reversed",
                      updatemenus=[{"buttons": buttons, "x": 1.0, "y": 1.15, "xanchor": "right"}]
                      if len(schemes) > 1 else [])
    return fig


def scheme_bars(scan, metric: str = "rel_error") -> go.Figure:
    """Grouped bars: for each module type, the mean ``metric`` over layers, one bar per scheme."""
    t = scan.table
    modules = _modules(t)
    fig = go.Figure()
    for s in scan.schemes:
        means = t[t.scheme == s].groupby("module")[metric].mean().reindex(modules)
        fig.add_trace(go.Bar(x=modules, y=means.to_numpy(dtype=float), name=s))
    fig.update_layout(barmode="group", xaxis_title="module",
                      yaxis_title=f"mean {_LABELS.get(metric, metric)}",
                      title=_title(f"{' vs '.join(scan.schemes)} per module type "
                                   f"(blocksize {scan.blocksize})", scan))
    return fig


def blocksize_figure(errors: Sequence[QuantError], metric: str = "rel_error") -> go.Figure:
    """One line per scheme (``+dq`` with double quantization) of ``metric`` against blocksize.

    >>> errs = [ll.quant_error(W, s, bs) for s in ("nf4", "fp4", "int8") for bs in (64, 128, 256)]
    >>> blocksize_figure(errs)
    """
    fig = go.Figure()
    groups: dict[str, list[QuantError]] = {}
    for e in errors:
        groups.setdefault(e.scheme + ("+dq" if e.double_quant else ""), []).append(e)
    for label, errs in groups.items():
        errs = sorted(errs, key=lambda e: e.blocksize)
        fig.add_trace(go.Scatter(x=[e.blocksize for e in errs],
                                 y=[float(getattr(e, metric)) for e in errs], name=label,
                                 mode="lines+markers",
                                 customdata=[e.bits_per_param for e in errs],
                                 hovertemplate="blocksize %{x}<br>%{y:.4g}<br>"
                                               "%{customdata:.3f} bits/param<extra>" + label
                                               + "</extra>"))
    fig.update_layout(xaxis={"type": "log", "title": "blocksize", "dtick": np.log10(2)},
                      yaxis_title=_LABELS.get(metric, metric), title="error against blocksize")
    return fig


def weight_histogram(hist: WeightHistogram) -> go.Figure:
    """Bars of ``hist.counts`` at ``hist.centers`` (one bar per bin, no gaps) and one vertical red
    line per level of ``hist.levels`` (the scheme's code points × the median block absmax: the
    levels a typical block can represent; weights between two levels round to the nearer one).

    >>> weight_histogram(lora_lab.hf.quant.roundtrip.weight_histogram_data(W, "nf4", name="up"))
    """
    top = float(hist.counts.max())
    levels = hist.levels
    xs = np.repeat(levels, 3)                     # x: (l, l, NaN) per level: one segment each
    ys = np.tile([0.0, top, np.nan], len(levels))  # y: (0, max count, NaN)
    xs[2::3] = np.nan
    fig = go.Figure([
        go.Bar(x=hist.centers, y=hist.counts, width=hist.width, name=hist.name,
               marker_color="#7f8c9b", hovertemplate="%{x:.4g}: %{y} weights<extra></extra>"),
        go.Scatter(x=xs, y=ys, mode="lines",
                   name=f"{hist.scheme} code × median absmax ({hist.scale:.3g})",
                   line={"color": "#d62728", "width": 1}),
    ])
    fig.update_layout(bargap=0, xaxis_title="weight value", yaxis_title="count",
                      title=f"{hist.name}: {hist.numel:,} weights and the {len(levels)} "
                            f"{hist.scheme} levels (blocksize {hist.blocksize})")
    return fig


def recovery_figure(results: RecoveryResult | Sequence[RecoveryResult],
                    labels: Sequence[str] | None = None) -> go.Figure:
    """Remaining relative error ‖W − Q − s·B·A‖/‖W‖ against rank (rank 0 = quantized only), a
    solid line for the SVD correction and a dashed one for LoftQ when it was run."""
    results = [results] if isinstance(results, RecoveryResult) else list(results)
    labels = list(labels or [f"{r.scheme} {tuple(r.shape)}" for r in results])
    fig = go.Figure()
    for res, label in zip(results, labels):
        x = [0, *res.ranks]
        fig.add_trace(go.Scatter(x=x, y=[res.quant_rel_error, *res.svd_rel_errors],
                                 mode="lines+markers", name=f"{label} SVD"))
        if res.loftq_rel_errors is not None:
            fig.add_trace(go.Scatter(x=x, y=[res.quant_rel_error, *res.loftq_rel_errors],
                                     mode="lines+markers", line={"dash": "dash"},
                                     name=f"{label} LoftQ ×{res.loftq_iters}"))
    fig.update_layout(xaxis_title="LoRA rank r", yaxis_title="remaining relative error",
                      title="what a rank-r correction wins back")
    return fig
