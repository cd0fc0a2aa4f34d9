"""The README's pictures of the QuantExplorer and the AdapterSwitchboard, from a real model.

``builtin:smollm2`` (SmolLM2-135M-Instruct, offline) in JupyterLab: the QuantExplorer's NF4 error
heatmap over its 30 layers × 7 modules (weights that carry Q4_1 rounding, so the error differs
from module to module: the colours mean something), and the switchboard answering a question in
words through the Generate button.  Checks: the heatmap's relative errors spread by more than 2%
between cells, the answer names Paris, and nothing shows an error; with ``LORA_LAB_SCREENSHOTS``
set the two widgets are saved as the README's ``quant_explorer.png`` and ``switchboard.png``
(light theme; the dark theme is checked the same way).  Skipped where builtin:smollm2 is not
installed (failed in CI).
"""

from __future__ import annotations

import os

import pytest
from conftest import (
    close_page,
    console_errors,
    look_problems,
    open_notebook,
    plot_data,
    save_screenshot,
    set_theme,
    wait_theme,
    wait_until,
    widget_problems,
    write_notebook,
)

pytestmark = pytest.mark.browser

CELLS = [
    '''import tempfile, pathlib, torch, lora_lab as ll
from lora_lab.ui import AdapterSwitchboard, QuantExplorer
torch.set_num_threads(2)
model, tok = ll.load_model("builtin:smollm2")
quant = QuantExplorer(model)
quant.add_class("ll-quant")
quant''',
    '''folders = pathlib.Path(tempfile.mkdtemp())
for i, name in enumerate(("concise", "verbose")):      # small random B: adapters that still speak
    adapted = ll.attach(ll.load_model("builtin:smollm2")[0], ll.AdapterSpec(r=8, alpha=16), name=name)
    g = torch.Generator().manual_seed(i)
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 1e-3)
    ll.save_adapter(adapted, folders / name)
board = AdapterSwitchboard(model, tok)
for name in ("concise", "verbose"):
    board.load(folders / name)
board.activate(None)
board.prompt.value = "What is the capital of France?"
board.max_new_tokens.value = 16
board.add_class("ll-switch")
board''',
]


@pytest.fixture(scope="module", params=["light", "dark"])
def smol_page(request, browser, jupyter):
    from lora_lab.hf.model import smollm2

    if not smollm2.available():               # as tests/conftest.py's require_smollm2
        why = f"builtin:smollm2 needs its package: {smollm2.INSTALL}"
        pytest.fail(why) if os.environ.get("CI") else pytest.skip(why)
    set_theme(jupyter, request.param)
    name = write_notebook(jupyter, f"smollm2_{request.param}.ipynb", CELLS)
    try:
        page = open_notebook(browser, jupyter, name, "lab")
    finally:
        set_theme(jupyter, "light")
    wait_theme(page, request.param)
    page.theme = request.param
    yield page
    close_page(page)


def test_real_model_widgets_show_structure_and_words(smol_page):
    page = smol_page
    quant = page.locator(".ll-quant")
    quant.scroll_into_view_if_needed()
    heat = wait_until(lambda: (lambda p: p if len(p) == 2 and p[0]["z"] else None)(
        plot_data(page, ".ll-quant")), what="the quantization heatmap")[0]
    cells = [v for row in heat["z"][0] for v in row if v is not None]
    assert len(cells) == 30 * 7 and max(cells) / min(cells) > 1.02, (min(cells), max(cells))
    if page.theme == "light":
        save_screenshot(quant, "quant_explorer.png")
    board = page.locator(".ll-switch")
    board.scroll_into_view_if_needed()
    board.locator("button").filter(has_text="generate").first.click()
    wait_until(lambda: "tokens/s" in board.inner_text(), timeout_s=120, what="the generation")
    answer = board.locator("textarea").nth(1).input_value()
    assert "Paris" in answer, answer
    if page.theme == "light":
        save_screenshot(board, "switchboard.png")
    for scope in (".ll-quant", ".ll-switch"):
        assert look_problems(page, scope) == [], scope
    assert widget_problems(page) == [] and console_errors(page) == []
