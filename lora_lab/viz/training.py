"""Training curves: history rows in, a plotly figure out.

The figure has five panels: loss (train, its smoothed curve, and eval), learning rate, grad norm,
tokens/s (raw and smoothed) and memory.  Each run contributes the same :data:`TRACES` (nine traces,
in this order), so a live view can update one run's traces in place and several runs overlay in
one figure.

Smoothing is TensorBoard's debiased exponential moving average: with weight w in [0, 1),

    m_t = w · m_{t-1} + (1 - w) · y_t,     m_0 = 0,     smoothed_t = m_t / (1 - w^t)

(the division removes the bias toward the zero start).  The same EMA, with the same weight (the
dashboard's smoothing slider), draws the bold tokens/s line over the faint raw points: per-step
throughput is noisy (data-dependent lengths, other processes) and the trend is what a reader wants.

Memory is the *peak so far* on a CPU: the running maximum of the per-step RSS samples,
``peak_t = max(rss_1, ..., rss_t)``, a staircase that rises when a longer batch or the optimizer
state arrives; raw RSS jitters by tens of MiB as the allocator returns pages, which says nothing.
On a GPU it is what ``torch.cuda`` reports after each step: allocated (tensors alive) and reserved
(held by the caching allocator, what ``nvidia-smi`` sees, itself a high-water mark).

The learning-rate axis gets explicit ticks (:func:`~lora_lab.viz.ticks.distinct_ticks`): one
significant digit would print "3e-3" on every tick of a cosine decay from 3e-3.  Arrays are numpy,
never lists: plotly serialises them several times faster (as typed binary arrays, not JSON lists).
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .theme import TEMPLATE
from .ticks import distinct_ticks

__all__ = ["ema", "run_arrays", "run_traces", "trace_updates", "training_figure", "lr_axis",
           "Curves", "TRACES", "PALETTE"]

TRACES = ("train", "train (smoothed)", "eval", "lr", "grad norm", "tokens/s",
          "tokens/s (smoothed)", "memory", "memory reserved")
# trace -> (row, col) of its panel
PANELS = {"train": (1, 1), "train (smoothed)": (1, 1), "eval": (1, 1), "lr": (1, 3),
          "grad norm": (2, 1), "tokens/s": (2, 2), "tokens/s (smoothed)": (2, 2),
          "memory": (2, 3), "memory reserved": (2, 3)}
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")


def ema(y: np.ndarray, weight: float) -> np.ndarray:
    """Debiased exponential moving average of ``y`` (shape (n,)) with ``weight`` in [0, 1).

    NaNs are skipped (they neither update the average nor are replaced).
    """
    y = np.asarray(y, dtype=float)
    if weight <= 0 or y.size == 0:
        return y.copy()
    out = np.empty_like(y)
    m, k = 0.0, 0
    for i, v in enumerate(y):
        if np.isfinite(v):
            m, k = weight * m + (1 - weight) * v, k + 1
        out[i] = m / (1 - weight ** k) if k else np.nan
    return out


def _col(rows: list[dict], key: str) -> np.ndarray:
    return np.array([np.nan if r.get(key) is None else r[key] for r in rows], dtype=float)


def run_arrays(history) -> dict[str, np.ndarray]:
    """numpy arrays of one run's history (a DataFrame or a list of row dicts).

    Keys: ``step``, ``loss``, ``lr``, ``grad_norm``, ``tokens_per_s``, ``memory``,
    ``memory_reserved`` (per logged step) and ``eval_step``, ``eval_loss`` (per evaluation).
    Memory is CUDA allocated/reserved when recorded, else the running maximum of the process RSS
    (peak so far; NaN samples are skipped).
    """
    rows = history.to_dict("records") if hasattr(history, "to_dict") else list(history)
    steps = [r for r in rows if r.get("event", "step") == "step"]
    evals = [r for r in rows if r.get("event") == "eval"]
    cuda = any(r.get("cuda_allocated_mb") is not None for r in steps)
    return {
        "step": _col(steps, "step"), "loss": _col(steps, "loss"), "lr": _col(steps, "lr"),
        "grad_norm": _col(steps, "grad_norm"), "tokens_per_s": _col(steps, "tokens_per_s"),
        "memory": _col(steps, "cuda_allocated_mb") if cuda else running_max(_col(steps, "rss_mb")),
        "memory_reserved": _col(steps, "cuda_reserved_mb") if cuda else np.empty(0),
        "eval_step": _col(evals, "step"), "eval_loss": _col(evals, "eval_loss"),
    }


def running_max(y: np.ndarray) -> np.ndarray:
    """``out[t] = max(y[0..t])`` over the finite values (NaN until the first one)."""
    y = np.asarray(y, dtype=float)
    filled = np.where(np.isfinite(y), y, -np.inf)
    out = np.maximum.accumulate(filled) if y.size else y.copy()
    return np.where(np.isfinite(out), out, np.nan)


def lr_axis(lr: np.ndarray) -> dict:
    """``tickvals``/``ticktext`` for the learning-rate axis (distinct labels; see module doc)."""
    lr = np.asarray(lr, dtype=float)
    lr = lr[np.isfinite(lr)]
    if not lr.size:
        return dict(tickvals=None, ticktext=None)
    vals, text = distinct_ticks(float(lr.min()), float(lr.max()))
    return dict(tickvals=vals, ticktext=text, tickmode="array")


def _thin(n: int, max_points: int) -> np.ndarray | slice:
    """Indices of at most ``max_points`` evenly spread points of n (always the first and last)."""
    if n <= max_points:
        return slice(None)
    return np.unique(np.linspace(0, n - 1, max_points).round().astype(int))


def trace_updates(arrays: dict[str, np.ndarray], smoothing: float,
                  max_points: int = 2000) -> list[dict]:
    """``{"x", "y"}`` for each of :data:`TRACES`, in order, from :func:`run_arrays` output.

    The smoothed loss and tokens/s are ``arrays["loss_smoothed"]`` and
    ``arrays["tokens_per_s_smoothed"]`` when given (kept incrementally by :class:`Curves`), else
    computed here.  Long runs are thinned to ``max_points`` per trace after
    smoothing: a plot has fewer pixels than that, and the cost of a redraw stays bounded.
    """
    s = arrays["step"]
    smooth = arrays.get("loss_smoothed")
    smooth = ema(arrays["loss"], smoothing) if smooth is None else smooth
    tps = arrays.get("tokens_per_s_smoothed")
    tps = ema(arrays["tokens_per_s"], smoothing) if tps is None else tps
    i = _thin(len(s), max_points)
    x = s[i]
    mem_x = x if arrays["memory_reserved"].size else np.empty(0)
    mem_r = arrays["memory_reserved"][i] if arrays["memory_reserved"].size else np.empty(0)
    return [dict(x=x, y=arrays["loss"][i]), dict(x=x, y=smooth[i]),
            dict(x=arrays["eval_step"], y=arrays["eval_loss"]), dict(x=x, y=arrays["lr"][i]),
            dict(x=x, y=arrays["grad_norm"][i]), dict(x=x, y=arrays["tokens_per_s"][i]),
            dict(x=x, y=tps[i]), dict(x=x, y=arrays["memory"][i]), dict(x=mem_x, y=mem_r)]


class _RunningEMA:
    """The debiased EMA of a growing series, one value at a time (same numbers as :func:`ema`)."""

    def __init__(self, weight: float):
        self.weight, self.m, self.k, self.out = weight, 0.0, 0, []

    def add(self, v: float) -> None:
        w = self.weight
        if np.isfinite(v):
            self.m, self.k = w * self.m + (1 - w) * v, self.k + 1
        self.out.append(self.m / (1 - w ** self.k) if self.k else np.nan)

    @classmethod
    def of(cls, values, weight: float) -> "_RunningEMA":
        run = cls(weight)
        for v in values:
            run.add(v)
        return run


class Curves:
    """One run's curves for a live view: records are appended in O(1) (the smoothed loss and
    tokens/s too, with the EMA's running state; the peak memory with its running maximum), and
    :meth:`arrays` converts to numpy in O(n)."""

    STEP = ("step", "loss", "lr", "grad_norm", "tokens_per_s", "memory", "memory_reserved")
    SMOOTHED = ("loss", "tokens_per_s")

    def __init__(self, smoothing: float):
        self.cols: dict[str, list] = {k: [] for k in (*self.STEP, "eval_step", "eval_loss")}
        self.weight = smoothing
        self._ema = {k: _RunningEMA(smoothing) for k in self.SMOOTHED}
        self._peak = -np.inf

    @property
    def smoothed(self) -> list[float]:
        """The smoothed loss so far (a list, one value per step)."""
        return self._ema["loss"].out

    def add(self, rec: dict) -> None:
        """Add one history record (a ``step`` or an ``eval`` event)."""
        get = lambda k: np.nan if rec.get(k) is None else float(rec[k])  # noqa: E731
        if rec.get("event") == "eval":
            self.cols["eval_step"].append(get("step"))
            self.cols["eval_loss"].append(get("eval_loss"))
            return
        cuda = rec.get("cuda_allocated_mb") is not None
        memory = get("cuda_allocated_mb") if cuda else get("rss_mb")
        if not cuda:                                    # peak RSS so far (see the module doc)
            self._peak = max(self._peak, memory) if np.isfinite(memory) else self._peak
            memory = self._peak if np.isfinite(self._peak) else np.nan
        values = {"step": get("step"), "loss": get("loss"), "lr": get("lr"),
                  "grad_norm": get("grad_norm"), "tokens_per_s": get("tokens_per_s"),
                  "memory": memory}
        for k, v in values.items():
            self.cols[k].append(v)
        if cuda:
            self.cols["memory_reserved"].append(get("cuda_reserved_mb"))
        for k in self.SMOOTHED:
            self._ema[k].add(values[k])

    def set_smoothing(self, weight: float) -> None:
        """Change the EMA weight (recomputes the smoothed curves once)."""
        self.weight = weight
        self._ema = {k: _RunningEMA.of(self.cols[k], weight) for k in self.SMOOTHED}

    def arrays(self) -> dict[str, np.ndarray]:
        out = {k: np.asarray(v, dtype=float) for k, v in self.cols.items()}
        for k in self.SMOOTHED:
            out[f"{k}_smoothed"] = np.asarray(self._ema[k].out, dtype=float)
        return out


def run_traces(name: str, arrays: dict[str, np.ndarray], color: str, smoothing: float,
               show_legend: bool = True) -> list[go.Scatter]:
    """The nine traces of one run (see :data:`TRACES`)."""
    cuda = arrays["memory_reserved"].size > 0
    labels = dict(zip(TRACES, TRACES))
    labels["memory"] = "CUDA allocated" if cuda else "peak RSS"
    labels["memory reserved"] = "CUDA reserved"
    labels["tokens/s (smoothed)"] = f"tokens/s (EMA {smoothing:g})"
    style = {"train": dict(mode="lines", line=dict(color=color, width=1), opacity=0.35),
             "tokens/s": dict(mode="markers", marker=dict(color=color, size=3), opacity=0.35),
             "tokens/s (smoothed)": dict(mode="lines", line=dict(color=color, width=2)),
             "memory": dict(mode="lines", line=dict(color=color, shape="hv")),
             "train (smoothed)": dict(mode="lines", line=dict(color=color, width=2)),
             "eval": dict(mode="lines+markers", line=dict(color=color, dash="dot"),
                          marker=dict(symbol="diamond", size=7)),
             "memory reserved": dict(mode="lines", line=dict(color=color, dash="dash"))}
    out = []
    for key, xy in zip(TRACES, trace_updates(arrays, smoothing)):
        out.append(go.Scatter(name=f"{name} · {labels[key]}", legendgroup=name,
                              showlegend=show_legend and key in ("train (smoothed)", "eval"),
                              **style.get(key, dict(mode="lines", line=dict(color=color))), **xy))
    return out


def training_figure(runs: dict | None = None, smoothing: float = 0.6, log_y: bool = False,
                    height: int = 480) -> go.Figure:
    """A figure of the training curves of ``runs`` (name → history DataFrame or rows), overlaid."""
    fig = make_subplots(rows=2, cols=3, specs=[[{"colspan": 2}, None, {}], [{}, {}, {}]],
                        subplot_titles=("loss", "learning rate", "grad norm", "tokens/s",
                                        "memory (MiB)"), horizontal_spacing=0.07,
                        vertical_spacing=0.14)
    for i, (name, hist) in enumerate((runs or {}).items()):
        for key, tr in zip(TRACES, run_traces(name, run_arrays(hist), PALETTE[i % len(PALETTE)],
                                              smoothing)):
            fig.add_trace(tr, *PANELS[key])
    fig.update_yaxes(type="log" if log_y else "linear", row=1, col=1)
    lrs = [run_arrays(h)["lr"] for h in (runs or {}).values()]
    # ticks on the right, in the figure's margin: a decay seen early needs long labels
    # (2.999996e-3) that would otherwise run into the loss panel
    fig.update_yaxes(row=1, col=3, side="right", automargin=True,
                     **lr_axis(np.concatenate(lrs) if lrs else np.empty(0)))
    fig.update_xaxes(title_text="step", row=2)
    fig.update_layout(height=height, margin=dict(l=50, r=20, t=40, b=40), template=TEMPLATE,
                      legend=dict(orientation="h", y=-0.18), uirevision="keep")
    return fig
