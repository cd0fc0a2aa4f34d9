"""One place that makes live plotly figures, and works around FigureWidget's known problems.

* **Live figure.**  :class:`LiveFigure` wraps a ``plotly.graph_objects.FigureWidget`` (updated in
  place through comm messages) when anywidget is installed; otherwise, or with
  ``static=True`` / ``LORA_LAB_STATIC_FIGURES=1`` (Colab without the custom widget manager), or in
  VS Code (its "Failed to load view class AnyView"), a plain ``go.Figure`` redrawn into an
  ``ipywidgets.Output``.  Both expose ``.figure`` (whose ``.data`` tests can read), ``.widget`` (what
  to display), ``batch_update()``, ``replace(fig)`` and ``sync()``.
* **Late views.**  A FigureWidget syncs its full state only when displayed; later updates are
  transient messages, so a view that connects later (a browser reload, Voilà, saved widget state)
  shows stale data.  Traces added after construction to a widget inside a container do not show
  there either.  :func:`resync` copies the Python-side figure into the widget's synced state
  (``_widget_data``/``_widget_layout``, private plotly attributes, hence one tested helper);
  ``batch_update`` does so after each batch unless told not to (``keep_synced=False``, for a
  caller that redraws many times a second and calls ``sync()`` at the end).  Checked in a real
  browser by tests/browser/test_browser_widgets.py (a reloaded page shows the moved rank cut).
* **Light and dark themes.**  Every figure gets :data:`lora_lab.viz.theme.TEMPLATE` (a white card
  with dark text: readable anywhere) and the CSS class ``ll-themed``.  :func:`theme_style` is an
  invisible ``HTML`` widget carrying :data:`THEME_CSS`, which each lora_lab widget includes once:
  under JupyterLab's or Notebook 7's dark theme (``body[data-jp-theme-light="false"]``) and VS
  Code's (``body.vscode-dark``) it makes the figures' backgrounds transparent and their text and
  grid take the theme's colours (``--jp-ui-font-color1``, ``--jp-border-color2``).  plotly.js
  writes colours as inline styles, which a stylesheet's ``!important`` overrides; heatmap cell
  text (its contrast chosen by plotly per cell) is left alone.  Checked in both themes by
  tests/browser/test_browser_look.py.
"""

from __future__ import annotations

import copy
import os
from contextlib import contextmanager

import ipywidgets as widgets
import plotly.graph_objects as go

from ..viz.theme import TEMPLATE

__all__ = ["figure_widget_available", "resync", "LiveFigure", "THEME_CSS", "theme_style", "ERROR_DIV"]

# an error message's box: the theme's error colour (readable on light and dark), else a dark red
ERROR_DIV = "<div style='color:var(--jp-error-color1,#b00020);white-space:pre-wrap'>"

_DARK = ('body[data-jp-theme-light="false"] .ll-themed', "body.vscode-dark .ll-themed")
# every axis's tick labels (groups "xtick", "y2tick", ...), axis and figure titles ("g-xtitle",
# "g-y2title", "g-gtitle"), subplot titles (annotations), legend and colour bar
_TEXT = ('g[class$="tick"] text', 'g[class^="g-"][class$="title"] text', ".annotation-text",
         ".legendtext", ".legendtitletext", ".cbaxis text", ".cbtitle text")


def _rules(targets, body: str) -> str:
    return ",".join(f"{d} {t}" for d in _DARK for t in targets) + "{" + body + "}"


THEME_CSS = "".join([
    _rules((".main-svg", "rect.bg", ".legend rect.bg"),
           "background:transparent!important;fill:transparent!important"),
    _rules(_TEXT, "fill:var(--jp-ui-font-color1,#e0e0e0)!important"),
    _rules((".gridlayer path", ".zerolinelayer path"),
           "stroke:var(--jp-border-color2,#444)!important"),
])
"""The dark-theme stylesheet (see the module docstring); light themes use the template as is."""


def theme_style() -> widgets.HTML:
    """An invisible widget carrying :data:`THEME_CSS`; put one in each top-level widget."""
    style = widgets.HTML(f"<style>{THEME_CSS}</style>",
                         layout=widgets.Layout(height="0px", margin="0px", overflow="hidden"))
    style.add_class("ll-theme-style")
    return style


def figure_widget_available() -> bool:
    """True when live ``go.FigureWidget``s should be used: anywidget imports (plotly needs it) and
    the front end is not one known to leave them blank.  ``LORA_LAB_STATIC_FIGURES=1`` forces the
    static figures, ``=0`` forces live ones.  VS Code (its kernels inherit ``VSCODE_PID``) gets
    static figures by default: its renderer has failed to load anywidget views ("Failed to load
    view class AnyView", plotly #5027), which leaves a blank cell."""
    forced = os.environ.get("LORA_LAB_STATIC_FIGURES", "").strip()
    if forced not in ("", "0"):
        return False
    if forced != "0" and ("VSCODE_PID" in os.environ or "VSCODE_CWD" in os.environ):
        return False
    try:
        import anywidget  # noqa: F401  (only whether it imports)
    except ImportError:
        return False
    return True


def resync(fw) -> None:
    """Make ``fw``'s synced widget state equal its Python-side figure (for late-connecting views)."""
    fw._widget_data = copy.deepcopy(fw._data)
    fw._widget_layout = copy.deepcopy(fw._layout_obj._props)


class LiveFigure:
    """A figure updated in place: a FigureWidget, or a static figure redrawn into an Output."""

    def __init__(self, fig: go.Figure, static: bool | None = None):
        self.static = (not figure_widget_available()) if static is None else bool(static)
        fig = go.Figure(fig).update_layout(template=TEMPLATE)
        if self.static:
            self.figure = go.Figure(fig)
            self.widget = widgets.Output()
            self._draw()
        else:
            self.figure = go.FigureWidget(fig)
            self.widget = self.figure
        self.widget.add_class("ll-themed")

    def _draw(self) -> None:
        from IPython import get_ipython
        from IPython.display import clear_output, display

        if getattr(get_ipython(), "kernel", None) is None:
            return  # no front end to draw for: display() would print the figure's repr to stdout
        with self.widget:
            clear_output(wait=True)
            display(self.figure)

    @contextmanager
    def batch_update(self, keep_synced: bool = True):
        """Group property updates into one message (FigureWidget) or one redraw (static).

        ``keep_synced`` (FigureWidget): also make the synced state match afterwards, so that a view
        connecting later (a reloaded page) shows this update too, not the figure as first
        displayed.  Costs a deep copy of the figure and one state message; a caller redrawing
        many times a second can pass False and call :meth:`sync` at the end instead."""
        if self.static:
            yield self.figure
            self._draw()
        else:
            with self.figure.batch_update():
                yield self.figure
            if keep_synced:
                resync(self.figure)

    def replace(self, fig: go.Figure) -> None:
        """Swap in all traces and the layout of ``fig`` (e.g. when a run is added), then resync."""
        fig = go.Figure(fig).update_layout(template=TEMPLATE)
        if self.static:
            self.figure = fig
            self._draw()
            return
        self.figure.data = ()
        self.figure.add_traces(list(fig.data))
        self.figure.layout = fig.layout
        resync(self.figure)

    def sync(self) -> None:
        """Bring views that connected late up to date (cheap enough for the end of a run)."""
        if self.static:
            self._draw()
        else:
            resync(self.figure)
