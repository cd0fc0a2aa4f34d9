"""One plotly template for every lora_lab figure, readable on light and dark front ends.

:data:`TEMPLATE` is plotly's ``plotly_white`` with an opaque white paper and plot area, dark grey
text (``#2a2a2a``: contrast 14:1 on white) and light grid lines.  Opaque on purpose: a figure
shown where no lora_lab stylesheet follows it (a static figure in VS Code's dark theme, Colab's
dark mode, an exported report) is then a white card with dark text, readable on any background,
never dark text on a dark page.  Inside JupyterLab's and Notebook 7's dark themes the widgets make
the figures follow the theme instead (transparent backgrounds, the theme's text colour;
:data:`lora_lab.ui.figure.THEME_CSS`).

The colour sequence is plotly's default (D3 category 10), whose hues stay distinct on white and on
JupyterLab Dark's ``#111`` background alike.
"""

from __future__ import annotations

import copy

import plotly.graph_objects as go
import plotly.io as pio

__all__ = ["TEMPLATE", "TEXT", "GRID"]

TEXT = "#2a2a2a"
GRID = "#e3e3e3"


def _template() -> go.layout.Template:
    t = copy.deepcopy(pio.templates["plotly_white"])
    t.layout.update(paper_bgcolor="white", plot_bgcolor="white", font=dict(color=TEXT),
                    title=dict(font=dict(color=TEXT)))
    for axis in ("xaxis", "yaxis"):
        t.layout[axis].update(gridcolor=GRID, zerolinecolor="#cfcfcf", linecolor="#bdbdbd",
                              tickcolor="#bdbdbd")
    return t


TEMPLATE = _template()
