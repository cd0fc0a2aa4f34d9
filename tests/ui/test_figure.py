"""Which figure a front end gets: live FigureWidgets where they render, static figures where they
are known to stay blank, and the user's override either way."""

import plotly.graph_objects as go
import pytest

from lora_lab.ui.figure import LiveFigure, figure_widget_available


@pytest.fixture
def clean_env(monkeypatch):
    for var in ("LORA_LAB_STATIC_FIGURES", "VSCODE_PID", "VSCODE_CWD"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_jupyter_gets_live_figures(clean_env):
    assert figure_widget_available()
    live = LiveFigure(go.Figure(go.Scatter(y=[1, 2])))
    assert not live.static and isinstance(live.widget, go.FigureWidget)


def test_vscode_gets_static_figures_unless_told_otherwise(clean_env):
    clean_env.setenv("VSCODE_PID", "4242")
    assert not figure_widget_available()
    live = LiveFigure(go.Figure(go.Scatter(y=[1, 2])))
    assert live.static and not isinstance(live.widget, go.FigureWidget)
    with live.batch_update() as fig:
        fig.data[0].y = [3, 4]
    assert tuple(live.figure.data[0].y) == (3, 4)
    clean_env.setenv("LORA_LAB_STATIC_FIGURES", "0")
    assert figure_widget_available()


def test_the_variable_forces_static_figures(clean_env):
    clean_env.setenv("LORA_LAB_STATIC_FIGURES", "1")
    assert not figure_widget_available()
    assert LiveFigure(go.Figure(), static=False).static is False  # an explicit argument wins
