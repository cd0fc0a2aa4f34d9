"""The look shared by the switchboard's controls: one label width, buttons sized to their text."""

from __future__ import annotations

import ipywidgets as widgets

__all__ = ["STYLE", "button", "slider"]

STYLE = {"description_width": "110px"}


def button(text: str, icon: str) -> widgets.Button:
    return widgets.Button(description=text, icon=icon, layout=widgets.Layout(width="auto"))


def slider(kind, value, lo, hi, label: str, step: float = 0.05):
    """A ``kind`` (IntSlider, FloatSlider) from ``lo`` to ``hi`` with the board's label width."""
    return kind(value=value, min=lo, max=hi, step=step, description=label, style=STYLE)
