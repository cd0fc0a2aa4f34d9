"""Every control a person can operate says what it is, to a screen reader too.

ipywidgets renders a control's ``description`` as its label and its ``tooltip`` as the ``title``
attribute; both are what assistive technology reads (WAI-ARIA accessible name: the label, else
the title).  A button with only an icon, or a slider with no label, is announced as "button" or
"slider".  This test builds every lora_lab widget on tiny models, walks each widget tree (boxes,
tabs, accordions) and asserts each button and slider has a description or a tooltip, and each
other input (text, number, dropdown, checkbox) a description, tooltip or placeholder.
"""

from __future__ import annotations

import ipywidgets as widgets
import pytest
import torch

import lora_lab as ll
from lora_lab.ui import AdapterDesigner, AdapterSwitchboard, QuantExplorer, RankExplorer, TrainingDashboard

pytestmark = pytest.mark.usefixtures("one_thread")

SLIDERS = (widgets.IntSlider, widgets.FloatSlider, widgets.FloatLogSlider, widgets.IntRangeSlider,
           widgets.FloatRangeSlider, widgets.SelectionSlider, widgets.SelectionRangeSlider)
BUTTONS = (widgets.Button, widgets.ToggleButton)
INPUTS = (widgets.Text, widgets.Textarea, widgets.IntText, widgets.FloatText,
          widgets.BoundedIntText, widgets.BoundedFloatText, widgets.Dropdown, widgets.Checkbox,
          widgets.ToggleButtons, widgets.SelectMultiple, widgets.Select, widgets.RadioButtons)


def walk(w):
    """``w`` and every widget under it (children of boxes, tabs and accordions)."""
    yield w
    for child in getattr(w, "children", ()) or ():
        yield from walk(child)


def name_of(w) -> str:
    """What a screen reader announces for ``w`` (empty: nothing)."""
    said = [getattr(w, "description", ""), getattr(w, "tooltip", None) or ""]
    if isinstance(w, widgets.ToggleButtons):
        said += list(w.tooltips or ())
    if isinstance(w, INPUTS) and not isinstance(w, BUTTONS + SLIDERS):
        said.append(getattr(w, "placeholder", "") or "")
    return " ".join(s.strip() for s in said if s and s.strip())


def unnamed(root) -> list[str]:
    out = []
    for w in walk(root):
        if isinstance(w, BUTTONS + SLIDERS + INPUTS) and not name_of(w):
            out.append(f"{type(w).__name__}(value={getattr(w, 'value', None)!r}, "
                       f"icon={getattr(w, 'icon', '')!r})")
    return out


def with_random_b(model, name, seed):
    model = ll.attach(model, ll.AdapterSpec(r=4), name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f"lora_B.{name}." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.fixture(scope="module")
def every_widget(tiny_llama_dir, tmp_path_factory):
    built = {"AdapterDesigner": AdapterDesigner(str(tiny_llama_dir)),
             "TrainingDashboard": TrainingDashboard(),
             "RankExplorer": RankExplorer(with_random_b(ll.load_model("builtin:tiny")[0], "r4", 0)),
             "QuantExplorer": QuantExplorer(ll.load_model("builtin:tiny")[0])}
    folder = tmp_path_factory.mktemp("a11y")
    for i, name in enumerate(("alpha", "beta")):            # two adapters: the blend sliders show
        ll.save_adapter(with_random_b(ll.load_model("builtin:tiny")[0], name, i), folder / name)
    board = AdapterSwitchboard(*ll.load_model("builtin:tiny"), background=False)
    for name in ("alpha", "beta"):
        board.load(folder / name)
    built["AdapterSwitchboard"] = board
    return built


@pytest.mark.parametrize("widget", ["AdapterDesigner", "TrainingDashboard", "RankExplorer",
                                    "QuantExplorer", "AdapterSwitchboard"])
def test_every_button_slider_and_input_has_a_name(every_widget, widget):
    root = every_widget[widget]
    controls = [w for w in walk(root) if isinstance(w, BUTTONS + SLIDERS + INPUTS)]
    assert len(controls) >= 3, f"{widget}: the walk found only {controls}"
    assert unnamed(root) == [], f"{widget}: controls a screen reader cannot name"


def test_the_walk_finds_an_unnamed_control():
    """The check itself: an icon-only button and an unlabelled slider are caught."""
    box = widgets.VBox([widgets.HBox([widgets.Button(icon="stop"), widgets.IntSlider()]),
                        widgets.Button(description="ok")])
    assert len(unnamed(box)) == 2
    box.children[0].children[0].tooltip = "Stop"
    box.children[0].children[1].description = "rank"
    assert unnamed(box) == []
