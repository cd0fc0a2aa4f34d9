"""Memory breakdown figure: a :class:`~lora_lab.hf.model.plan.MemoryEstimate` in, a plotly figure out.

One stacked bar per scenario (full FT, LoRA, QLoRA), one colour per term (base weights, 4-bit
constants, adapter, gradients, optimizer, activations, logits, allocator overhead, CUDA context),
and a dashed line at the device's memory.  Every size is in GiB (2³⁰ bytes).  The bars stack what
is allocated at the step's peak; the gradients' hover also gives all gradients (end of backward).
:func:`memory_traces` gives the per-term arrays alone, for updating a live figure in place.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

__all__ = ["TERM_LABELS", "all_gradients", "hover_template", "memory_figure", "memory_limit_name",
           "memory_title", "memory_traces", "term_label"]

GIB = 2**30
TERM_LABELS = {
    "base_weights": "base weights", "quant_constants": "quant constants",
    "adapter_weights": "adapter weights", "gradients": "gradients",
    "optimizer_states": "optimizer states", "activations": "activations", "logits": "logits + loss",
    "allocator_overhead": "allocator overhead", "cuda_context": "CUDA context",
}
_CPU_CONTEXT = "Python + libraries"          # the same term when training on the CPU
_COLORS = ["#4c78a8", "#9ecae9", "#f58518", "#ffbf79", "#e45756", "#54a24b", "#b279a2",
           "#bab0ac", "#79706e"]


def term_label(estimate, term: str) -> str:
    """The legend name of ``term``; on the CPU the CUDA-context term is the process's libraries."""
    if term == "cuda_context" and getattr(estimate, "on_cpu", False):
        return _CPU_CONTEXT
    return TERM_LABELS[term]


def memory_traces(estimate) -> tuple[list[str], dict[str, np.ndarray]]:
    """``(scenario names, {term: GiB per scenario})`` in stacking order."""
    names = list(estimate.scenarios)
    values = {t: np.array([estimate.scenarios[s][t] / GIB for s in names]) for t in TERM_LABELS}
    return names, values


def all_gradients(estimate) -> np.ndarray:
    """GiB of every gradient (end of backward) per scenario, whatever the peak holds."""
    return np.array([t["gradients_total"] / GIB for t in estimate.scenarios.values()])


def memory_limit_name(estimate) -> str:
    """The dashed line's name: ``"T4 (16 GiB)"``, ``"24 GiB"``, ``"CPU system RAM (… GiB)"``."""
    return estimate.device_text


def memory_title(estimate) -> str:
    v = estimate.verdicts()
    return (f"{estimate.model} on {estimate.device_text}: "
            + ", ".join(f"{s} {estimate.need(s) / GIB:.2f} GiB ({v[s]})" for s in v))


def hover_template(term: str, label: str) -> str:
    extra = "<br>all gradients: %{customdata:.2f} GiB" if term == "gradients" else ""
    return "%{x}<br>" + label + ": %{y:.2f} GiB at the peak" + extra + "<extra></extra>"


def memory_figure(estimate, height: int = 380) -> go.Figure:
    """Stacked GiB bars per scenario with the device limit as a dashed line."""
    names, values = memory_traces(estimate)
    grads = all_gradients(estimate)
    bars = []
    for t, c in zip(TERM_LABELS, _COLORS):
        label = term_label(estimate, t)
        bars.append(go.Bar(name=label, x=names, y=values[t], marker_color=c,
                           customdata=grads if t == "gradients" else None,
                           hovertemplate=hover_template(t, label)))
    limit = estimate.device_bytes / GIB
    line = go.Scatter(name=memory_limit_name(estimate), x=names, y=[limit] * len(names),
                      mode="lines", line={"color": "black", "dash": "dash"}, hoverinfo="name")
    fig = go.Figure(data=[*bars, line])
    fig.update_layout(barmode="stack", height=height,
                      title={"text": memory_title(estimate), "font_size": 13},
                      yaxis_title="GiB", legend={"orientation": "v"},
                      margin={"l": 50, "r": 10, "t": 50, "b": 30})
    return fig
