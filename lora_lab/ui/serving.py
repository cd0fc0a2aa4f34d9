"""The serving playground: a queue of requests, each naming an adapter, served in mixed batches.

A view over :class:`lora_lab.hf.generate.serving.ServingQueue` (all logic and all torch live there):
type a prompt and pick an adapter (or the base) to queue a request, or queue a burst of random ones;
**serve** runs batches formed across adapters and shows, after each batch, the tokens/s, each
request's latency, the batches' make-up and the adapters resident on the model.  Two sliders set the
rows per batch and how many adapters may be loaded at once (with a pool of saved adapters, fewer
resident adapters mean more loads).  **compare with base** serves the same prompts on the base
model alone, in the same batch sizes, for the ratio of mixed-adapter to base throughput.
"""

from __future__ import annotations

import html
import random

import ipywidgets as widgets

from ..hf.generate.serving import ServingQueue

__all__ = ["ServingPlayground", "DEFAULT_PROMPTS"]

DEFAULT_PROMPTS = ("reverse abc", "upper hello", "copy xyz", "sort dcba", "reverse hello world",
                   "upper lora")
_BASE = "(base)"


def _table(rows: list[list], head: list[str]) -> str:
    cells = "".join(f"<th style='text-align:left;padding:0 8px'>{h}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td style='padding:0 8px'>{html.escape(str(c))}</td>" for c in r)
                   + "</tr>" for r in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


class ServingPlayground(widgets.VBox):
    """``ServingPlayground(model, tok, pool=None, prompts=DEFAULT_PROMPTS)``: ``pool`` maps adapter
    names to saved folders (loaded on demand); None serves the adapters already on ``model``.
    ``queue`` is the :class:`ServingQueue`; ``comparison`` the last base comparison."""

    def __init__(self, model, tokenizer, *, pool: dict | None = None, prompts=DEFAULT_PROMPTS,
                 max_batch: int = 8, max_resident: int = 2, max_new_tokens: int = 12, seed: int = 0):
        W = widgets
        self.queue = ServingQueue(model, tokenizer, max_batch=max_batch, max_loras=max_resident,
                                  max_resident=max_resident, max_new_tokens=max_new_tokens, pool=pool)
        self.prompts, self.comparison, self._rng = list(prompts), None, random.Random(seed)
        names = self.queue.known()
        self.prompt = W.Text(value=self.prompts[0], description="prompt")
        self.adapter = W.Dropdown(options=[_BASE, *names], value=names[0] if names else _BASE,
                                  description="adapter")
        self.add_button = W.Button(description="queue request", icon="plus")
        self.burst_button = W.Button(description="queue 8 random", icon="random")
        self.serve_button = W.Button(description="serve", icon="play")
        self.base_button = W.Button(description="compare with base", icon="balance-scale")
        self.batch_size = W.IntSlider(value=max_batch, min=1, max=32, description="rows/batch")
        self.resident = W.IntSlider(value=max_resident, min=1, max=max(len(names), 1),
                                    description="adapters loaded" if pool else "adapters/batch")
        self.status, self.queued, self.results = W.HTML(), W.HTML(), W.HTML()
        self.add_button.on_click(lambda _: self.add(self.prompt.value, self._name(self.adapter.value)))
        self.burst_button.on_click(lambda _: self.burst(8))
        self.serve_button.on_click(lambda _: self.serve())
        self.base_button.on_click(lambda _: self.compare_with_base())
        self.batch_size.observe(lambda ch: setattr(self.queue, "max_batch", ch["new"]), "value")
        self.resident.observe(lambda ch: self._set_resident(ch["new"]), "value")
        super().__init__([W.HBox([self.prompt, self.adapter, self.add_button, self.burst_button]),
                          W.HBox([self.batch_size, self.resident, self.serve_button, self.base_button]),
                          self.status, self.queued, self.results])
        self.refresh()

    # ------------------------------------------------------------------ actions
    @staticmethod
    def _name(value):
        return None if value == _BASE else value

    def _set_resident(self, k: int) -> None:
        if self.queue.pool is not None:
            self.queue.set_max_resident(k)
        else:
            self.queue.max_loras = k
        self.refresh()

    def add(self, prompt: str, adapter: str | None) -> None:
        self.queue.submit(prompt, adapter)
        self.refresh()

    def burst(self, n: int) -> None:
        """Queue ``n`` requests: random prompts, random adapters (the base included)."""
        names = [None, *self.queue.known()]
        for _ in range(n):
            self.queue.submit(self._rng.choice(self.prompts), self._rng.choice(names))
        self.refresh()

    def serve(self) -> None:
        """Serve the whole queue, redrawing after every batch."""
        self.queue.run(on_batch=lambda _: self.refresh())
        self.refresh()

    def compare_with_base(self) -> dict | None:
        """Serve the last served prompts again, all on the base model, in the same batch size; store
        and return ``{"mixed_tokens_per_s", "base_tokens_per_s", "ratio"}``."""
        done = self.queue.served[-self.queue.max_batch * max(1, len(self.queue.batches)):]
        if not done:
            return None
        base = ServingQueue(self.queue.model, self.queue.tokenizer, max_batch=self.queue.max_batch,
                            max_new_tokens=self.queue.max_new_tokens)
        for s in done:
            base.submit(s.request.prompt, None)
        base.run()
        mixed = self.queue.summary()["tokens_per_s"]
        ref = base.summary()["tokens_per_s"]
        self.comparison = {"mixed_tokens_per_s": mixed, "base_tokens_per_s": ref,
                           "ratio": mixed / ref if ref else 0.0}
        self.refresh()
        return self.comparison

    # ------------------------------------------------------------------ view
    def refresh(self) -> None:
        q = self.queue
        s = q.summary()
        line = (f"<b>{s['tokens_per_s']:.1f} tokens/s</b> · {s['served']} served in {s['batches']} "
                f"batches · mean latency {s['mean_latency_s'] * 1e3:.0f} ms (max "
                f"{s['max_latency_s'] * 1e3:.0f}) · resident: {', '.join(s['resident']) or 'none'}"
                f" · adapter loads {s['loads']} · queued {s['queued']}")
        if self.comparison:
            c = self.comparison
            line += (f"<br>base alone: {c['base_tokens_per_s']:.1f} tokens/s → mixed/base = "
                     f"<b>{c['ratio']:.2f}</b>")
        self.status.value = line
        self.queued.value = _table([[r.id, r.adapter or _BASE, r.prompt] for r in list(q.queue)[:12]],
                                   ["queued", "adapter", "prompt"])
        self.results.value = (
            _table([[b.index, b.rows, ", ".join(b.adapters) or _BASE, b.mode, b.tokens,
                     f"{b.tokens_per_s:.1f}", b.loads] for b in q.batches[-6:]],
                   ["batch", "rows", "adapters", "routing", "tokens", "tokens/s", "loads"])
            + _table([[x.request.id, x.request.adapter or _BASE, x.batch, f"{x.latency_s * 1e3:.0f}",
                       x.tokens, x.text[:40]] for x in q.served[-12:]],
                     ["request", "adapter", "batch", "latency ms", "tokens", "text"]))

    def code(self) -> str:
        """Plain Python that serves the same way without widgets."""
        q = self.queue
        pool = f"pool={q.pool!r}, " if q.pool else ""
        return ("from lora_lab.hf.generate.serving import ServingQueue\n"
                f"server = ServingQueue(model, tok, {pool}max_batch={q.max_batch}, "
                f"max_loras={q.max_loras}, max_resident={q.max_resident}, "
                f"max_new_tokens={q.max_new_tokens})\n"
                "server.submit('reverse abc', adapter=None)\n"
                "server.run()\nserver.summary()\n")
