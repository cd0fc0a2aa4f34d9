"""``TrainingDashboard``: one live widget for a training run, and buttons that work while it runs.

Pass it to :func:`lora_lab.train` as a callback (or to ``transformers.Trainer`` through
:class:`lora_lab.LiveCallback`)::

    dash = TrainingDashboard()
    display(dash)
    result = lora_lab.train(model, tok, data, spec=spec, callbacks=[dash])

It shows train and eval loss (raw, smoothed, log-scale toggle), learning rate (ticks that tell apart
a decay from 3e-3), grad norm, tokens/s (raw points and their EMA, with the smoothing slider's
weight), memory (peak RSS so far on a CPU; CUDA allocated and reserved on a GPU: see
:mod:`lora_lab.viz.training`), a progress bar with ETA, and Stop / Pause-Resume / Save-now buttons.
The status line gives the last step's tokens/s (every non-padding token, prompts included) and, in
brackets, its supervised tokens/s (only those the loss learns from), and which loss runs (``full``
or ``chunked (C tokens)``: ``TrainSpec.chunked_loss``).  Redraws are throttled (``redraw_every_s``,
default 2 a second) and long runs are thinned to ``max_points`` per trace, so plotting costs well
under 3% of training time.  The figure stays after the run, and each run is kept: a second
``train(..., callbacks=[dash])`` overlays its curves on the first (resuming a run continues its
curve).  The Export button writes the run's choices as a standalone ``train.py`` with accelerate
configs (:func:`lora_lab.export.script.export_script`; see :meth:`set_export`).

**Why the buttons work while the cell is busy (ipywidgets #3468).**  A kernel executes one shell
message at a time; a button click is a ``comm_msg`` on the same shell channel, so it normally waits
until the training cell has finished, which is too late.  lora_lab keeps the loop on the calling
thread (so "Run All" runs in order, ``KeyboardInterrupt`` arrives where it is handled, and scripts
and nbclient need nothing special) and, between steps, *polls the kernel's queue*:
:func:`~lora_lab.ui.kernel.pump_kernel_events` takes the messages waiting for the busy main shell,
handles widget messages (``comm_msg``) at once, and re-queues everything else (such as the next
cell's ``execute_request`` under "Run All") to run, in order, after the cell.  Polling is throttled
to ``poll_every_s`` and costs a non-blocking socket poll when nothing is waiting.  We chose polling
over a worker thread because a worker does not help by itself (the cell must still block for "Run
All", and a blocked cell hears nothing), and torch/CUDA state, autocast and ``KeyboardInterrupt``
all belong to the main thread.  :class:`~lora_lab.train.events.Control` is thread-safe too, so
kernels that deliver comm messages on a subshell thread also work.  Outside a kernel the pump is a
no-op.
"""

from __future__ import annotations

import functools
import math
import time

import ipywidgets as widgets
import numpy as np

from ..errors import LoraLabError
from ..viz.training import TRACES, Curves, lr_axis, trace_updates, training_figure
from .export_panel import ExportPanel
from .figure import LiveFigure, theme_style
from .kernel import pump_kernel_events

__all__ = ["TrainingDashboard", "pump_kernel_events"]  # the pump lives in .kernel


# ----------------------------------------------------------------------------- the dashboard
def _timed(method):
    """Add the time spent in callback ``on_<event>`` to ``self.overhead[event]``."""

    @functools.wraps(method)
    def wrapper(self, *args):
        t0 = time.perf_counter()
        try:
            return method(self, *args)
        finally:
            self.overhead[method.__name__[3:]] += time.perf_counter() - t0

    return wrapper


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "–"
    s = int(round(s))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


class TrainingDashboard(widgets.VBox):
    """A live view of training runs; a callback for :func:`lora_lab.train` (see module docstring).

    ``runs`` maps run name → list of history rows (kept across runs); ``figure`` is the plotly
    figure (``figure.data`` holds the plotted arrays); ``control`` is the current run's Control;
    ``overhead`` the seconds its callbacks took per event (``redraws`` how many redraws that was).
    ``export``: what the Export button writes (see :meth:`set_export`): an ``AdapterDesigner`` or
    a dict of :func:`~lora_lab.export.script.export_script` arguments.
    """

    def __init__(self, smoothing: float = 0.6, log_y: bool = False, redraw_every_s: float = 0.5,
                 poll_every_s: float = 0.1, static: bool | None = None, height: int = 480,
                 max_points: int = 2000, export=None):
        self.runs: dict[str, list[dict]] = {}
        self._curves: dict[str, Curves] = {}
        self.max_points = max_points
        self.control = None
        self.redraw_every_s, self.poll_every_s, self.height = redraw_every_s, poll_every_s, height
        self.redraws = 0
        # seconds spent in this view's callbacks (drawing, polling), per event
        self.overhead = dict.fromkeys(("begin", "step", "eval", "save", "end"), 0.0)
        self._last_draw = self._last_poll = -math.inf
        self.smoothing = widgets.FloatSlider(value=smoothing, min=0.0, max=0.99, step=0.01,
                                             description="smoothing", continuous_update=False)
        self.log_y = widgets.Checkbox(value=log_y, description="log-scale loss", indent=False)
        self.stop_button = widgets.Button(description="Stop", icon="stop", button_style="danger",
                                          disabled=True, tooltip="Save the adapter and stop")
        self.pause_button = widgets.ToggleButton(description="Pause", icon="pause", disabled=True,
                                                 tooltip="Pause between steps / resume")
        self.save_button = widgets.Button(description="Save now", icon="save", disabled=True,
                                          tooltip="Write a checkpoint after this step")
        self.progress = widgets.IntProgress(value=0, min=0, max=1, description="step",
                                            layout=widgets.Layout(width="45%"))
        self.status = widgets.HTML("<i>waiting for a run</i>")
        self.live = LiveFigure(training_figure({}, smoothing, log_y, height), static=static)
        self.stop_button.on_click(lambda _: self._request("stop"))
        self.save_button.on_click(lambda _: self._request("save"))
        self.pause_button.observe(self._on_pause, names="value")
        self.smoothing.observe(self._on_smoothing, names="value")
        self.log_y.observe(self._on_log, names="value")
        buttons = widgets.HBox([self.stop_button, self.pause_button, self.save_button])
        self._export = export
        self.export_panel = ExportPanel(self.export_choice)
        super().__init__([theme_style(), widgets.HBox([self.progress, self.status]), buttons,
                          widgets.HBox([self.smoothing, self.log_y]), self.live.widget,
                          self.export_panel])

    # ---------------------------------------------------------------- export
    def set_export(self, source=None, **choice) -> None:
        """What the Export button writes: an :class:`~lora_lab.ui.AdapterDesigner` (its current
        choice) or :func:`~lora_lab.export.script.export_script` arguments
        (``adapter_spec=..., train_spec=..., model_id=..., data=...``)."""
        self._export = source if source is not None else choice

    def export_choice(self) -> dict:
        src = self._export
        if not src:
            raise LoraLabError("The dashboard does not know this run's choices (adapter, model, "
                               "data), so it cannot export them.",
                               "pass TrainingDashboard(export=designer) or call "
                               "dash.set_export(adapter_spec=..., train_spec=..., model_id=..., "
                               "data=...)")
        return src.export_choice() if hasattr(src, "export_choice") else dict(src)

    # ---------------------------------------------------------------- buttons (any thread)
    def _request(self, what: str) -> None:
        if self.control is None:
            return
        if what == "stop":
            self.control.stop("Stop button")
            self.status.value = "<b>stopping after this step…</b>"
        else:
            self.control.save_now()
            self.status.value = "<b>saving after this step…</b>"

    def _on_pause(self, change) -> None:
        if self.control is None:
            return
        if change["new"]:
            self.control.pause()
        else:
            self.control.resume()
        self.pause_button.description = "Resume" if change["new"] else "Pause"
        self.pause_button.icon = "play" if change["new"] else "pause"

    def _on_smoothing(self, change) -> None:
        for curves in self._curves.values():
            curves.set_smoothing(change["new"])
        self.redraw_all()

    def _on_log(self, change) -> None:
        with self.live.batch_update() as fig:
            fig.update_yaxes(type="log" if change["new"] else "linear", row=1, col=1)

    @property
    def figure(self):
        return self.live.figure

    # ---------------------------------------------------------------- callback events
    @_timed
    def on_begin(self, state, control) -> None:
        self.control = control
        name, k = state.run or f"run {len(self.runs) + 1}", 2
        resumed = state.step > 0 and name in self.runs  # a resumed run continues its own curve
        while name in self.runs and not resumed:
            name, k = f"{state.run or 'run'} ({k})", k + 1
        self._run = name
        self.runs.setdefault(name, [])
        self._curves.setdefault(name, Curves(self.smoothing.value))
        self.progress.max, self.progress.value = max(state.max_steps, 1), state.step
        for b in (self.stop_button, self.pause_button, self.save_button):
            b.disabled = False
        self.pause_button.value = False
        self.redraw_all()
        self._status(state, "running")

    @_timed
    def on_step(self, state, control) -> None:
        self._add(state)
        self._tick(state)

    @_timed
    def on_eval(self, state, control) -> None:
        self._add(state)
        self._tick(state, force=True)

    @_timed
    def on_save(self, state, control) -> None:
        self._status(state, f"saved {state.checkpoint}")

    def on_wait(self, state, control) -> None:
        self._status(state, "paused")
        self._poll(force=True)

    @_timed
    def on_end(self, state, control) -> None:
        for b in (self.stop_button, self.pause_button, self.save_button):
            b.disabled = True
        self._draw(state)
        self.live.sync()
        self._status(state, state.stop_reason or "done")

    # ---------------------------------------------------------------- drawing
    def _add(self, state) -> None:
        rec = state.as_record()
        self.runs[self._run].append(rec)
        self._curves[self._run].add(rec)

    def _poll(self, force: bool = False) -> None:
        now = time.perf_counter()
        if force or now - self._last_poll >= self.poll_every_s:
            self._last_poll = now
            pump_kernel_events()

    def _tick(self, state, force: bool = False) -> None:
        now = time.perf_counter()
        if force or now - self._last_draw >= self.redraw_every_s:
            self._draw(state)
        self._poll()

    def _draw(self, state) -> None:
        """Update the current run's traces in place, and the learning-rate ticks (one batched
        message)."""
        self._last_draw = time.perf_counter()
        self.redraws += 1
        names = list(self.runs)
        first = names.index(self._run) * len(TRACES)
        updates = trace_updates(self._curves[self._run].arrays(), self.smoothing.value,
                                self.max_points)
        with self.live.batch_update(keep_synced=False) as fig:  # on_end syncs once
            for trace, xy in zip(fig.data[first:first + len(TRACES)], updates):
                trace.x, trace.y = xy["x"], xy["y"]
            lrs = [np.asarray(t.y, float) for t in fig.data[TRACES.index("lr")::len(TRACES)]
                   if t.y is not None and len(t.y)]
            fig.update_yaxes(row=1, col=3, **lr_axis(np.concatenate(lrs) if lrs else np.empty(0)))
        self._status(state, "running")

    def redraw_all(self) -> None:
        """Rebuild the figure from every kept run (after a new run or a smoothing change)."""
        self.live.replace(training_figure(self.runs, self.smoothing.value, self.log_y.value,
                                          self.height))

    def _status(self, state, what: str) -> None:
        if state is None:
            return
        self.progress.value = min(state.step, self.progress.max)
        loss = f"loss {state.loss:.4f}" if state.loss is not None else ""
        ev = f" · eval {state.eval_loss:.4f}" if state.eval_loss is not None else ""
        tps = (f" · <span title='non-padding tokens (prompt and response) per second of the last "
               f"step'>{state.tokens_per_s:,.0f} tok/s</span>") if state.tokens_per_s else ""
        sup = state.supervised_tokens_per_s
        if sup is not None:
            tps += (f" (<span title='tokens the loss is averaged over (labels ≠ -100) per second "
                    f"of the last step'>{sup:,.0f} supervised</span>)")
        kind = getattr(state, "loss_kind", None)
        kind = (f" · <span title='which loss runs: full-vocabulary logits, or the LM head and "
                f"loss over chunks of tokens (TrainSpec.chunked_loss)'>{kind} loss</span>") if kind else ""
        prec = getattr(state, "precision", None)  # "fp32", "bf16 autocast" (TrainSpec.precision)
        kind += (f" · <span title='what the matrix products run in (TrainSpec.precision; \"auto\" "
                 f"picks bf16 autocast on a CPU or GPU with native bf16)'>{prec}</span>") if prec else ""
        if getattr(state, "compiled", False):
            kind += (" · <span title='the decoder layers run through torch.compile (TrainSpec.compile); "
                     "the first step includes compiling them'>compiled</span>")
        self.status.value = (f"{state.step}/{state.max_steps} · {loss}{ev}{tps}{kind} · "
                             f"elapsed {_fmt_s(state.elapsed_s)} · ETA {_fmt_s(state.eta_s)} · "
                             f"<i>{what}</i>")

    def clear(self) -> None:
        """Forget all kept runs."""
        self.runs.clear()
        self._curves.clear()
        self.redraw_all()
