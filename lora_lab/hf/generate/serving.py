"""A small serving loop: a queue of requests, each naming an adapter, served in mixed batches.

This is the shape of a multi-LoRA server (S-LoRA, Sheng et al. 2023; vLLM's ``max_loras``) at
notebook scale, with no threads and no network, so that every step can be watched and tested:

* **Requests** arrive in a FIFO queue, each with a prompt and an adapter name (None: the base).
* **Batches** are formed across adapters: take requests in arrival order, up to ``max_batch`` rows,
  skipping (for now) a request whose adapter would make more than ``max_loras`` distinct adapters in
  the batch (vLLM's ``max_loras``: the adapters one batch may hold).  Each batch is one call of
  :func:`lora_lab.generate` with one adapter per row (:mod:`lora_lab.hf.generate.mixed`): one forward
  pass per token for all rows.
* **Resident adapters.**  With a *pool* (name → saved folder), at most ``max_resident`` adapters
  stay loaded on the model; a batch that needs another loads it and evicts the least recently used
  one that the batch does not need (S-LoRA keeps all adapters in host memory and pages them onto
  the GPU the same way).  ``loads`` counts the loads, the cost that a larger resident set saves.

Every served request records its latency (arrival → its row finished), queueing time and tokens;
every batch its size, adapters, tokens and tokens/s.  :class:`ServingQueue` is the logic;
:class:`lora_lab.ui.serving.ServingPlayground` is a view over it.
"""

from __future__ import annotations

import itertools
import time
import warnings
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable

from ...errors import AdapterError, SpecError
from .._peft import is_peft

__all__ = ["Request", "Served", "BatchStats", "ServingQueue", "form_batch"]


@dataclass(frozen=True)
class Request:
    """One request: ``id`` (arrival order), prompt, adapter (None: base), and arrival time."""

    id: int
    prompt: str
    adapter: str | None
    arrived: float


@dataclass(frozen=True)
class Served:
    """A finished request: its text and tokens, the batch that served it, latency (arrival → row
    finished) and queueing time (arrival → its batch started), in seconds."""

    request: Request
    text: str
    tokens: int
    batch: int
    latency_s: float
    queued_s: float


@dataclass(frozen=True)
class BatchStats:
    """One batch: rows, distinct adapters, new tokens, seconds, how rows were routed (``mode``: mixed,
    uniform or grouped) and adapter loads it needed."""

    index: int
    rows: int
    adapters: tuple
    tokens: int
    seconds: float
    mode: str
    loads: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def form_batch(queue: list[Request], max_batch: int, max_loras: int) -> list[Request]:
    """The next batch: requests in arrival order, at most ``max_batch`` of them and at most
    ``max_loras`` distinct adapters (the base, None, does not count: it needs no adapter loaded).
    A request that would exceed ``max_loras`` waits for a later batch; the oldest request is always
    taken, so nothing starves."""
    batch, names = [], set()
    for req in queue:
        if len(batch) == max_batch:
            break
        if req.adapter is None or req.adapter in names or len(names) < max_loras:
            batch.append(req)
            if req.adapter is not None:
                names.add(req.adapter)
    return batch


@dataclass
class ServingQueue:
    """Serve requests on ``model`` in mixed batches (see the module docstring).

    ``pool``: name → saved adapter folder, loaded on demand (at most ``max_resident`` at once); None
    serves the adapters already loaded on the model.  ``clock`` is injectable for tests.
    """

    model: object
    tokenizer: object
    max_batch: int = 8
    max_loras: int = 4
    max_new_tokens: int = 16
    pool: dict | None = None
    max_resident: int = 4
    clock: Callable[[], float] = time.perf_counter
    queue: deque = field(default_factory=deque)
    served: list = field(default_factory=list)
    batches: list = field(default_factory=list)
    loads: int = 0
    _ids: itertools.count = field(default_factory=itertools.count)
    _lru: OrderedDict = field(default_factory=OrderedDict)

    def __post_init__(self):
        for name, value in (("max_batch", self.max_batch), ("max_loras", self.max_loras),
                            ("max_new_tokens", self.max_new_tokens), ("max_resident", self.max_resident)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SpecError("ServingQueue", name, value, "must be an integer >= 1", f"pass {name}=4")
        if self.pool is not None and self.max_loras > self.max_resident:
            self.max_loras = self.max_resident        # a batch cannot hold more than is resident
        for n in self.resident():
            self._lru[n] = None

    # ------------------------------------------------------------------ adapters
    def resident(self) -> list[str]:
        """Adapters loaded on the model now."""
        return sorted(self.model.peft_config) if is_peft(self.model) else []

    def known(self) -> list[str]:
        """Adapters a request may name: the pool's, else the loaded ones."""
        return sorted(set(self.pool or {}) | set(self.resident()))

    def _ensure(self, names: set) -> int:
        """Load the pool adapters in ``names`` that are not resident, evicting least recently used
        ones outside ``names`` to stay within ``max_resident``; return how many were loaded."""
        from ..adapters.io import load_adapter

        missing = sorted(names - set(self.resident()))
        for n in missing:                 # load first: peft cannot delete a model's last adapter
            self.model = load_adapter(self.model, self.pool[n], name=n, activate=False)
        self.model.eval()
        for n in names:
            self._lru.pop(n, None)
            self._lru[n] = None
        self._evict(keep=names)
        self.loads += len(missing)
        return len(missing)

    def _evict(self, keep=frozenset()) -> None:
        """Delete least recently used adapters (not in ``keep``) until ``max_resident`` remain."""
        from ..adapters.registry import delete_adapter

        for victim in [v for v in self._lru if v not in keep]:
            if len(self.resident()) <= self.max_resident:
                break
            with warnings.catch_warnings():   # "adapter X was active which is now deleted"
                warnings.filterwarnings("ignore", message=".*which is now deleted.*")
                delete_adapter(self.model, victim)
            self._lru.pop(victim)

    def set_max_resident(self, k: int) -> None:
        """Change how many pool adapters may stay loaded; evicts the least recently used now."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise SpecError("ServingQueue", "max_resident", k, "must be an integer >= 1", "pass 2")
        self.max_resident = k
        if self.pool is not None:
            self.max_loras = min(self.max_loras, k)
            self._evict()

    # ------------------------------------------------------------------ requests
    def submit(self, prompt: str, adapter: str | None = None) -> Request:
        """Queue ``prompt`` for ``adapter`` (None: the base model); returns the :class:`Request`."""
        if adapter is not None and adapter not in self.known():
            raise AdapterError(f"Request names adapter {adapter!r}, which this server does not have.",
                               f"use one of {self.known() + [None]} (None is the base model)")
        req = Request(next(self._ids), prompt, adapter, self.clock())
        self.queue.append(req)
        return req

    def step(self) -> BatchStats | None:
        """Serve one batch from the queue; None when the queue is empty."""
        from .stream import generate

        batch = form_batch(list(self.queue), self.max_batch, self.max_loras)
        if not batch:
            return None
        names = {r.adapter for r in batch} - {None}
        loads = self._ensure(names) if self.pool is not None else 0
        start = self.clock()
        results = generate(self.model, self.tokenizer, [r.prompt for r in batch],
                           adapter=[r.adapter for r in batch], max_new_tokens=self.max_new_tokens)
        seconds = self.clock() - start
        index = len(self.batches)
        for r in batch:
            self.queue.remove(r)
        for r, res in zip(batch, results):
            self.served.append(Served(r, res.text, res.n_tokens, index,
                                      latency_s=start + res.seconds - r.arrived, queued_s=start - r.arrived))
        stats = BatchStats(index, len(batch), tuple(sorted(names)), sum(x.n_tokens for x in results),
                           seconds, results[0].settings.get("batch_mode", "uniform"), loads)
        self.batches.append(stats)
        return stats

    def run(self, on_batch: Callable[[BatchStats], None] | None = None) -> list[BatchStats]:
        """Serve batches until the queue is empty; ``on_batch(stats)`` after each."""
        out = []
        while (stats := self.step()) is not None:
            out.append(stats)
            if on_batch is not None:
                on_batch(stats)
        return out

    def summary(self) -> dict:
        """Totals: requests served, batches, tokens, tokens/s over the batches' time, mean and max
        latency (s), adapter loads, resident adapters."""
        tokens = sum(b.tokens for b in self.batches)
        seconds = sum(b.seconds for b in self.batches)
        lat = [s.latency_s for s in self.served]
        return {"served": len(self.served), "batches": len(self.batches), "tokens": tokens,
                "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
                "mean_latency_s": sum(lat) / len(lat) if lat else 0.0,
                "max_latency_s": max(lat, default=0.0), "loads": self.loads,
                "resident": self.resident(), "queued": len(self.queue)}
