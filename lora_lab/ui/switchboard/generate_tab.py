"""The **generate** tab: one prompt through the active adapter, streamed into the widget.

Max new tokens, greedy or sampled (temperature, top-p), and Stop, which sets the host's stop flag;
:func:`lora_lab.hf.generate.stream.generate` checks it after every token, so the tokens made so far
are kept (``finish_reason == "stopped"``).  The text box is redrawn at most every
``host.redraw_every_s`` seconds, whatever the token rate.
"""

from __future__ import annotations

import time

import ipywidgets as widgets

from ...hf.generate.stream import GenerationResult, encode_for_generation, generate
from .host import Host
from .style import STYLE, button, slider

__all__ = ["GenerateTab", "speed_text", "streamer"]


def streamer(box: widgets.Textarea, host: Host):
    """An ``on_token`` that appends to ``box``, redrawing at most every ``host.redraw_every_s``."""
    state = {"text": "", "drawn": 0.0}

    def on_token(piece: str) -> None:
        state["text"] += piece
        now = time.perf_counter()
        if now - state["drawn"] >= host.redraw_every_s:
            state["drawn"] = now
            box.value = state["text"]
    return on_token


def speed_text(res: GenerationResult) -> str:
    """One line under a generation: tokens, tokens/s, time to the first token, why it ended."""
    return (f"{res.n_tokens} tokens · <b>{res.tokens_per_s:.1f} tokens/s</b> · first token "
            f"{res.first_token_s * 1e3:.0f} ms · ended by {res.finish_reason}")


class GenerateTab(widgets.VBox):
    """Prompt, sampling settings, Generate and Stop; ``result`` is the last
    :class:`~lora_lab.hf.generate.stream.GenerationResult`."""

    def __init__(self, host: Host):
        W, L = widgets, widgets.Layout
        self.host = host
        self.result: GenerationResult | None = None
        self.prompt = W.Textarea(placeholder="prompt", description="prompt", style=STYLE,
                                 layout=L(width="95%"))
        self.max_new_tokens = slider(W.IntSlider, 48, 1, 512, "max new tokens", step=1)
        self.greedy = W.Checkbox(value=True, description="greedy")
        self.temperature = slider(W.FloatSlider, 0.7, 0.05, 2.0, "temperature")
        self.top_p = slider(W.FloatSlider, 0.95, 0.05, 1.0, "top-p")
        self.output = W.Textarea(disabled=True, layout=L(width="95%", height="8em"))
        self.speed = W.HTML()
        self.generate_button, self.stop_button = button("generate", "play"), button("stop", "stop")
        self.stop_button.disabled = True
        self.generate_button.on_click(lambda _: host.safely(self.generate))
        self.stop_button.on_click(lambda _: self.stop())
        sampling = W.HBox([self.greedy, self.temperature, self.top_p])
        super().__init__([self.prompt, W.HBox([self.max_new_tokens, self.generate_button,
                                               self.stop_button]), sampling, self.output,
                          self.speed])

    def settings(self) -> dict:
        """The keyword arguments of :func:`~lora_lab.hf.generate.stream.generate` the controls give."""
        return {"max_new_tokens": int(self.max_new_tokens.value), "greedy": bool(self.greedy.value),
                "temperature": float(self.temperature.value), "top_p": float(self.top_p.value),
                "spec": self.host.spec}

    def stop(self) -> None:
        """Ask the running generation to end after its current token (thread-safe)."""
        self.host.stop_flag.set()
        if self.host.busy:
            self.speed.value = "<b>stopping…</b>"

    def generate(self, prompt: str | None = None) -> None:
        """Generate from ``prompt`` (default: the prompt box) with the active adapter, streaming into
        ``output``; the result lands in ``result`` (in the background inside a kernel)."""
        host = self.host
        prompt = self.prompt.value if prompt is None else prompt
        settings = self.settings()
        encode_for_generation(host.tokenizer, prompt, host.spec)      # refuse a bad prompt now

        def job():
            self.output.value, self.speed.value = "", "<i>generating…</i>"
            res = generate(host.model, host.tokenizer, prompt, on_token=streamer(self.output, host),
                           stop=host.stop_flag, **settings)
            self.result = res
            self.output.value = res.text
            self.speed.value = speed_text(res)
        host.launch(job)
