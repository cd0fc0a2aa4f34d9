"""Memory breakdown figure: a :class:`~lora_lab.hf.model.plan.MemoryEstimate` in, a plotly figure out.

One stacked bar per scenario (full FT, LoRA, QLoRA), one colour per term (base weights, 4-bit
constants, adapter, gradients, optimizer, activations, logits, allocator overhead, CUDA context),
and a dashed line at the device's memory.  :func:`memory_traces` gives the per-term arrays alone,
for updating a live figure in place.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

__all__ = ["memory_figure", "memory_traces", "memory_title", "TERM_LABELS"]

GIB = 2**30
TERM_LABELS = {
    "base_weights": "base weights", "quant_constants": "quant constants",
    "adapter_weights": "adapter weights", "gradients": "gradients",
    "optimizer_states": "optimizer states", "activations": "activations", "logits": "logits + loss",
    "allocator_overhead": "allocator overhead", "cuda_context": "CUDA context",
}
_COLORS = ["#4c78a8", "#9ecae9", "#f58518", "#ffbf79", "#e45756", "#54a24b", "#b279a2",
           "#bab0ac", "#79706e"]


def memory_traces(estimate) -> tuple[list[str], dict[str, np.ndarray]]:
    """``(scenario names, {term: GiB per scenario})`` in stacking order."""
    names = list(estimate.scenarios)
    values = {t: np.array([estimate.scenarios[s][t] / GIB for s in names]) for t in TERM_LABELS}
    return names, values


def memory_title(estimate) -> str:
    v = estimate.verdicts()
    return (f"{estimate.model} on {estimate.device}: "
            + ", ".join(f"{s} {estimate.need(s) / GIB:.1f} GiB ({v[s]})" for s in v))


def memory_figure(estimate, height: int = 380) -> go.Figure:
    """Stacked GiB bars per scenario with the device limit as a dashed line."""
    names, values = memory_traces(estimate)
    bars = [go.Bar(name=TERM_LABELS[t], x=names, y=values[t], marker_color=c,
                   hovertemplate="%{x}<br>" + TERM_LABELS[t] + ": %{y:.2f} GiB<extra></extra>")
            for t, c in zip(TERM_LABELS, _COLORS)]
    limit = estimate.device_bytes / GIB
    line = go.Scatter(name=f"{estimate.device} ({limit:.0f} GiB)", x=names, y=[limit] * len(names),
                      mode="lines", line=dict(color="black", dash="dash"), hoverinfo="name")
    fig = go.Figure(data=[*bars, line])
    fig.update_layout(barmode="stack", height=height, title=dict(text=memory_title(estimate), font_size=13),
                      yaxis_title="GiB", legend=dict(orientation="v"),
                      margin=dict(l=50, r=10, t=50, b=30))
    return fig
