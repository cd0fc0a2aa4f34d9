"""What serving many adapters in one batch costs: decoding throughput against the number of adapters.

:func:`throughput_figure` draws the records of
:func:`lora_lab.hf.generate.throughput.mixed_throughput` (one per side: ``way`` ``"single"``,
``"mixed"`` or ``"base"``, ``adapters`` K, ``tokens_per_s``, ``vs_single``, ``label``; a list of
dicts or a DataFrame), as ``benchmarks/serving.py`` and notebook 04 measure them:

* left, tokens/s of the batch against K (one line per ``label``, e.g. per model), with the base
  model's tokens/s as a dotted line of the same colour (the price of the adapters themselves);
* right, the same as a fraction of single-adapter throughput (``vs_single``; 1 = K adapters cost
  nothing more than one), with the target line when one is given (issue 17: 0.75 at K = 4; peft's
  own test bounds a mixed batch at 0.5).

K is on a log₂ axis (1, 2, 4, …).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import DEFAULT_PLOTLY_COLORS
from plotly.subplots import make_subplots

__all__ = ["throughput_figure"]


def throughput_figure(records, target: float | None = 0.75, title: str | None = None,
                      height: int = 380) -> go.Figure:
    """Two panels against the number of adapters K in the batch (module docstring).

    Traces, per label in order of appearance: ``"<label>"`` (left, tokens/s of the mixed sides,
    x = K), ``"<label> base"`` (left, dotted, the base model's tokens/s over the same x range) and
    ``"<label> vs one adapter"`` (right, ``vs_single``); then ``"target"`` (right, dashed) when
    ``target`` is given.  A label of None is drawn as ``"batch"``.
    """
    t = pd.DataFrame(list(records) if not isinstance(records, pd.DataFrame) else records)
    if t.empty:
        raise ValueError("throughput_figure needs at least one record")
    t = t.assign(label=t.get("label", pd.Series([None] * len(t))).fillna("batch").astype(str))
    mixed = t[t["way"] == "mixed"].sort_values("adapters")
    ks = np.sort(mixed["adapters"].unique()).astype(float)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("tokens/s of the batch",
                                                        "throughput / one adapter's"))
    for i, label in enumerate(dict.fromkeys(t["label"])):
        colour = DEFAULT_PLOTLY_COLORS[i % len(DEFAULT_PLOTLY_COLORS)]
        m = mixed[mixed["label"] == label]
        fig.add_scatter(x=m["adapters"].to_numpy(float), y=m["tokens_per_s"].to_numpy(float), name=label,
                        mode="lines+markers", line=dict(color=colour), legendgroup=label,
                        hovertemplate="%{x} adapters: %{y:.4g} tokens/s<extra>" + label + "</extra>",
                        row=1, col=1)
        base = t[(t["label"] == label) & (t["way"] == "base")]
        if len(base) and len(ks):
            b = float(base["tokens_per_s"].iloc[0])
            fig.add_scatter(x=[ks[0], ks[-1]], y=[b, b], name=f"{label} base", mode="lines",
                            line=dict(color=colour, dash="dot"), legendgroup=label,
                            hovertemplate="base model: %{y:.4g} tokens/s<extra>" + label + "</extra>",
                            row=1, col=1)
        fig.add_scatter(x=m["adapters"].to_numpy(float), y=m["vs_single"].to_numpy(float),
                        name=f"{label} vs one adapter", mode="lines+markers", line=dict(color=colour),
                        legendgroup=label, showlegend=False,
                        hovertemplate="%{x} adapters: %{y:.3f} of one adapter<extra>" + label + "</extra>",
                        row=1, col=2)
    if target is not None and len(ks):
        fig.add_scatter(x=[ks[0], ks[-1]], y=[target, target], name="target", mode="lines",
                        line=dict(color="grey", dash="dash"), row=1, col=2,
                        hovertemplate=f"target {target}<extra></extra>")
    ticks = dict(type="log", tickvals=list(ks), ticktext=[str(int(k)) for k in ks],
                 title="adapters in the batch (K)")
    fig.update_xaxes(**ticks)
    spread = t["tokens_per_s"].max() / max(t["tokens_per_s"].min(), 1e-12)
    fig.update_yaxes(title_text="tokens/s", type="log" if spread > 20 else "linear", row=1, col=1)
    top = max(1.05, float(np.nanmax(t["vs_single"].to_numpy(float))) * 1.05)
    fig.update_yaxes(title_text="fraction of single-adapter tokens/s", range=[0, top], row=1, col=2)
    fig.update_layout(title=title or "One batch, many adapters: throughput against the number of adapters",
                      legend=dict(orientation="h", y=-0.25), height=height)
    return fig
