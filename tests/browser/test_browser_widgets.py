"""Every lora_lab widget, rendered by JupyterLab 4 and Notebook 7 in Chromium, and used by clicking.

One notebook per front end builds the five widgets on ``builtin:tiny-random`` (adapters get random
``B`` so that their spectra are not zero) and tags each with a CSS class (``add_class``) so the test
can find it.  The checks read what the browser shows: the summary texts and what plotly.js draws
(``gd.data`` / ``gd.layout``), before and after an interaction, and that no widget anywhere shows an
error (:func:`conftest.widget_problems`).
"""

from __future__ import annotations

import re

import pytest
from conftest import (
    FRONTENDS,
    close_page,
    open_notebook,
    plot_data,
    save_notebook,
    save_screenshot,
    wait_until,
    widget_problems,
    write_notebook,
)

pytestmark = pytest.mark.browser

SETUP = '''
import torch, lora_lab as ll
from lora_lab.ui import (AdapterDesigner, AdapterSwitchboard, QuantExplorer, RankExplorer,
                         TrainingDashboard)
torch.set_num_threads(1)
MODEL = "builtin:tiny-random"

def randomized(model, name, r, seed):
    """Attach a LoRA adapter and give it a random B, as if trained (peft starts with B = 0).
    Seeded before attach too: A's init draws from the global generator, and an unseeded A once
    made alpha's greedy reply start with eos (an empty generation, a flaky test)."""
    torch.manual_seed(seed)
    model = ll.attach(model, ll.AdapterSpec(r=r, alpha=2 * r), name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n and f".{name}." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model
'''
CELLS = [
    SETUP,
    # the shape of Llama-3.2-1B, as a config only: nothing is downloaded or allocated
    'from transformers import LlamaConfig\n'
    'designer = AdapterDesigner(LlamaConfig(vocab_size=128256, hidden_size=2048, '
    'intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, '
    'num_key_value_heads=8, tie_word_embeddings=True))\n'
    'designer.add_class("ll-designer")\ndesigner',
    'ranked = randomized(ll.load_model(MODEL)[0], "r8", 8, seed=1)\n'
    'explorer = RankExplorer(ranked)\nexplorer.add_class("ll-rank")\nexplorer',
    'quant = QuantExplorer(ll.load_model(MODEL)[0])\nquant.add_class("ll-quant")\nquant',
    'import tempfile, pathlib\nfolders = pathlib.Path(tempfile.mkdtemp())\n'
    'for i, name in enumerate(("alpha", "beta")):\n'
    '    adapted = randomized(ll.load_model(MODEL)[0], name, 4, seed=10 + i)\n'
    '    ll.save_adapter(adapted, folders / name)\n'
    'base, tok = ll.load_model(MODEL)\nboard = AdapterSwitchboard(base, tok)\n'
    'for name in ("alpha", "beta"):\n    board.load(folders / name)\n'
    'board.prompt.value = "abc"\nboard.max_new_tokens.value = 12\n'
    'board.add_class("ll-switch")\nboard',
    'dash = TrainingDashboard()\ndash.add_class("ll-dash")\ndash',
]
# figures each widget shows, and whether they must hold traces (an idle dashboard has none yet)
WIDGETS = {"ll-designer": (1, True), "ll-rank": (2, True), "ll-quant": (2, True),
           "ll-switch": (0, False), "ll-dash": (1, False)}


@pytest.fixture(scope="module", params=FRONTENDS)
def widgets_page(request, browser, jupyter):
    name = write_notebook(jupyter, f"widgets_{request.param}.ipynb", CELLS)
    page = open_notebook(browser, jupyter, name, request.param)
    page.frontend = request.param
    yield page
    close_page(page)


def no_problems(page) -> None:
    problems = widget_problems(page)
    assert problems == [], f"{page.frontend}: widgets show errors: {problems}"


def text_of(page, scope: str, pattern: str) -> str:
    """The inner text of the first element under ``scope`` whose text matches ``pattern``."""
    return page.locator(f"{scope} .widget-html-content").filter(
        has_text=re.compile(pattern)).first.inner_text()


def drawn(page, scope: str, n: int) -> list[dict] | None:
    """The figures under ``scope`` once there are exactly ``n`` and plotly has drawn each (for
    :func:`wait_until`), else None."""
    plots = plot_data(page, scope)
    return plots if len(plots) == n and all(p["svg"] for p in plots) else None


def test_every_widget_renders_its_figures_without_errors(widgets_page):
    page = widgets_page
    for cls, (n_plots, filled) in WIDGETS.items():
        widget = page.locator(f".{cls}")
        widget.wait_for(state="visible")
        box = widget.bounding_box()
        assert box and box["height"] > 100, f"{cls} is not drawn ({box})"
        if n_plots:
            plots = wait_until(lambda: drawn(page, f".{cls}", n_plots), what=f"{cls}'s {n_plots} figures")
        else:
            plots = plot_data(page, f".{cls}")     # drawn (height checked above) and holds none
        assert len(plots) == n_plots, (cls, plots)
        for p in plots:
            assert p["height"] > 100 and (p["traces"] > 0 or not filled), (cls, p)
    no_problems(page)
    if page.frontend == "lab":
        # quant_explorer.png and switchboard.png come from builtin:smollm2 (test_browser_smollm2.py)
        for cls, file in (("ll-designer", "designer.png"), ("ll-rank", "rank_explorer.png")):
            save_screenshot(page.locator(f".{cls}"), file)


def trainable(page) -> int:
    text = text_of(page, ".ll-designer", r"trainable [\d,]+")
    return int(re.search(r"trainable ([\d,]+)", text).group(1).replace(",", ""))


def test_designer_rank_changes_the_parameter_count(widgets_page):
    page = widgets_page
    before = trainable(page)
    rank = page.locator(".ll-designer .widget-text").filter(has_text="rank r").locator("input")
    assert rank.input_value() == "8"
    rank.fill("16")
    rank.press("Enter")
    after = wait_until(lambda: trainable(page) if trainable(page) != before else None,
                       what="the trainable count to change")
    assert after == 2 * before  # LoRA adds r·(in + out) per adapted layer: linear in r
    rank.fill("8")
    rank.press("Enter")
    wait_until(lambda: trainable(page) == before, what="the count to come back")
    no_problems(page)


def test_designer_target_toggle_changes_the_memory_chart(widgets_page):
    page = widgets_page
    designer = page.locator(".ll-designer")
    (chart,) = plot_data(page, ".ll-designer")
    before = trainable(page)
    designer.locator(".lm-TabBar-tab").filter(has_text="target modules").click()
    box = designer.get_by_role("checkbox", name=re.compile(r"^gate_proj"))
    box.uncheck()
    changed = wait_until(lambda: [c for c in plot_data(page, ".ll-designer")
                                  if c["y"] != chart["y"]], what="the memory chart to change")
    assert len(changed) == 1 and changed[0]["names"] == chart["names"]   # the same chart, redrawn
    # fewer adapted layers: the adapter's bars shrink in the LoRA scenarios, full FT is untouched
    term = chart["names"].index("adapter weights")
    old_bars = dict(zip(chart["x"][term], chart["y"][term]))
    new_bars = dict(zip(changed[0]["x"][term], changed[0]["y"][term]))
    assert new_bars.keys() == old_bars.keys() and "full FT" in old_bars
    assert new_bars["full FT"] == old_bars["full FT"]
    # LoRA adds r·(in + out) per adapted layer: gate_proj (2048 → 8192) of 16 layers at r = 8 goes
    # out of 7 modules whose sum per layer is 8 · 44032 (q, o 4096; k, v 2560; gate, up, down 10240)
    gate = 16 * 8 * (2048 + 8192)
    assert trainable(page) == before - gate, (before, trainable(page))
    for s in ("LoRA", "QLoRA"):
        assert new_bars[s] == pytest.approx(old_bars[s] * (before - gate) / before, rel=1e-9), s
    box.check()
    wait_until(lambda: plot_data(page, ".ll-designer")[0]["y"] == chart["y"],
               what="the chart to come back")
    no_problems(page)


def test_rank_explorer_slider_moves_the_cut(widgets_page):
    page = widgets_page
    explorer = page.locator(".ll-rank")
    heat, detail = plot_data(page, ".ll-rank")
    summary = text_of(page, ".ll-rank", r"rank \d+ of r = 8")
    handle = explorer.locator(".noUi-handle").first
    handle.focus()
    handle.press("Home")                                   # noUiSlider: Home = the minimum
    wait_until(lambda: "rank 1 of r = 8" in text_of(page, ".ll-rank", r"of r = 8"),
               what="the summary to show rank 1")
    heat2, detail2 = wait_until(lambda: (lambda d: d if d[1]["shapes"] != detail["shapes"]
                                         else None)(plot_data(page, ".ll-rank")),
                                what="the cut line to move")
    assert detail2["shapes"][0] == pytest.approx(1.5)      # the cut sits between σ₁ and σ₂
    assert heat2["z"] != heat["z"]                         # energy kept at k = 1 is less
    assert text_of(page, ".ll-rank", r"of r = 8") != summary
    no_problems(page)


def test_quant_explorer_scheme_changes_the_heatmap(widgets_page):
    page = widgets_page
    heat, hist = plot_data(page, ".ll-quant")
    page.locator(".ll-quant select").first.select_option("int8")
    heat2 = wait_until(lambda: (lambda d: d[0] if d[0]["z"] != heat["z"] else None)(
        plot_data(page, ".ll-quant")), what="the int8 heatmap")
    mean = lambda z: sum(v for row in z[0] for v in row if v is not None) / max(  # noqa: E731
        sum(v is not None for row in z[0] for v in row), 1)
    assert mean(heat2["z"]) < mean(heat["z"])              # int8 errs far less than nf4
    assert "int8" in text_of(page, ".ll-quant", r"bits/param")
    no_problems(page)


def test_switchboard_switches_and_generates(widgets_page):
    page = widgets_page
    board = page.locator(".ll-switch")
    active = board.locator(".widget-dropdown").filter(has_text="active").locator("select")
    active.select_option("alpha")
    wait_until(lambda: "switched to alpha" in board.inner_text(), what="the switch label")
    board.locator("button").filter(has_text="generate").first.click()
    wait_until(lambda: "tokens/s" in board.inner_text(), what="the generation to finish")
    out = board.locator("textarea").nth(1).input_value()
    assert len(out) > 0, "the generation shows no text"
    active.select_option("(base)")
    wait_until(lambda: "switched to (base)" in board.inner_text(), what="the switch to the base")
    no_problems(page)


def test_a_reloaded_page_shows_the_current_figures(widgets_page, browser, jupyter):
    """A view that connects late (a browser reload after saving) must show the figures as they
    are now, after the interactions above, not as they were first displayed (plotly's FigureWidget keeps its
    first state for late views unless lora_lab resyncs it)."""
    page = widgets_page
    name = f"widgets_{page.frontend}.ipynb"
    saved = save_notebook(page, jupyter, name)     # waits for the server's answer to the save
    views = [o for c in saved["cells"] for o in c.get("outputs", [])
             if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert len(views) >= 5, f"the saved notebook holds {len(views)} widget outputs"
    now = {cls: plot_data(page, f".{cls}") for cls in ("ll-designer", "ll-rank", "ll-quant")}
    late = open_notebook(browser, jupyter, name, page.frontend, run=False)
    try:
        for cls, plots in now.items():
            late.locator(f".{cls}").wait_for(state="visible")
            seen = wait_until(lambda: drawn(late, f".{cls}", len(plots)),
                              what=f"{cls}'s {len(plots)} figures after the reload")
            assert len(seen) == len(plots) > 0, (cls, len(seen), len(plots))
            for a, b in zip(seen, plots):
                assert (a["x"], a["y"], a["z"], a["shapes"], a["title"]) == \
                    (b["x"], b["y"], b["z"], b["shapes"], b["title"]), f"{cls} is stale"
        assert widget_problems(late) == []
    finally:
        close_page(late)
