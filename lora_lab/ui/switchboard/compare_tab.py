"""The **side by side** tab: one prompt through the base and the chosen adapters, in columns.

Each column is a greedy (or sampled, with the generate tab's settings) generation with that adapter
switched on for the call only (``generate(..., adapter=name)``), so comparing leaves the active
adapter as it was.  Stop skips the columns not yet started.
"""

from __future__ import annotations

import html

import ipywidgets as widgets

from ...errors import AdapterError
from ...hf.generate.stream import GenerationResult, encode_for_generation, generate
from .generate_tab import GenerateTab, speed_text, streamer
from .host import BASE, Host
from .style import STYLE, button

__all__ = ["CompareTab"]


class CompareTab(widgets.VBox):
    """Choose adapters and run them side by side; ``comparison`` maps name → result, and
    ``column_outputs`` name → the column's text box.  The prompt and the settings are those of the
    ``source`` tab."""

    def __init__(self, host: Host, source: GenerateTab):
        self.host, self.source = host, source
        self.comparison: dict[str, GenerationResult] = {}
        self.compare_with = widgets.SelectMultiple(options=[BASE], value=(BASE,), rows=4,
                                                   description="compare", style=STYLE)
        self.columns, self.column_outputs = widgets.HBox(), {}
        self.compare_button = button("run side by side", "columns")
        self.compare_button.on_click(lambda _: host.safely(self.compare))
        super().__init__([widgets.HBox([self.compare_with, self.compare_button]), self.columns])

    def show_names(self, names: list[str]) -> None:
        """Offer ``[BASE, *names]``, keeping the selection; adapters new to the list join it."""
        seen, picked = set(self.compare_with.options), set(self.compare_with.value)
        chosen = [c for c in [BASE, *names] if c in picked or c not in seen]  # new: in
        self.compare_with.options = [BASE, *names]
        self.compare_with.value = tuple(chosen or [BASE, *names])

    def compare(self, prompt: str | None = None, names=None) -> None:
        """Run ``prompt`` through each of ``names`` (default: the ``compare`` selection; None or
        ``"(base)"`` is the base model, as ``adapter=None`` elsewhere, shown and keyed as
        ``"(base)"``) into side-by-side columns; results in ``comparison``."""
        host = self.host
        prompt = self.source.prompt.value if prompt is None else prompt
        if isinstance(names, str):
            names = [names]
        names = list(dict.fromkeys(BASE if n is None else n for n in (     # None: the base model
            self.compare_with.value if names is None else names)))
        unknown = [n for n in names if n != BASE and n not in host.names()]
        if not names or unknown:
            raise AdapterError(f"Cannot compare {names}: unknown adapters {unknown}.",
                               f"choose from {[BASE, *host.names()]} (None also means {BASE!r})")
        settings = self.source.settings()
        encode_for_generation(host.tokenizer, prompt, host.spec)
        host.guard()
        host.say(host.unmerge_first())
        self.column_outputs = {n: widgets.Textarea(disabled=True, layout=widgets.Layout(
            width="100%", height="8em")) for n in names}
        speeds = {n: widgets.HTML() for n in names}
        self.columns.children = [widgets.VBox([widgets.HTML(f"<b>{html.escape(n)}</b>"),
                                               self.column_outputs[n], speeds[n]],
                                              layout=widgets.Layout(flex="1 1 0")) for n in names]

        def job():
            self.comparison = {}
            for n in names:
                if host.stop_flag.is_set():
                    speeds[n].value = "<i>skipped (stopped)</i>"
                    continue
                box = self.column_outputs[n]
                res = generate(host.model, host.tokenizer, prompt, adapter=None if n == BASE else n,
                               on_token=streamer(box, host), stop=host.stop_flag, **settings)
                self.comparison[n] = res
                box.value, speeds[n].value = res.text, speed_text(res)
        host.launch(job)
