"""What serving many adapters in one batch costs: decoding speed of a batch spread over K adapters
against the same batch on one adapter (and on the base model).

One protocol for every side, so that the ratios mean something (``benchmarks/serving.py`` and
notebook 04 both use it):

* the same prompts (one batch of ``rows``), the same ``max_new_tokens``, greedy decoding with the KV
  cache through :func:`lora_lab.generate` (one left-padded batch, one forward pass per token);
* **single**: every row on ``adapters[0]`` (peft's ordinary forward: one adapter for the batch);
  **K adapters**: row i on ``adapters[i mod K]`` (one batch, each row through its own adapter,
  :mod:`~lora_lab.hf.generate.routing`); **base**: every row on the base model (adapters off);
* one warm-up call per side, then ``repeats`` rounds in which every side runs once (interleaved, so
  that a change of machine load hits all sides alike); the median is kept.

Rows may stop at different tokens (their eos), and a batch runs until its last row stops, so a call
is timed per *decoding step*: ``seconds / (new tokens of the longest row)`` (the prefill counts as
the first step, on every side).  ``tokens_per_s = rows / step`` is the batch's throughput while all
its rows decode; ``vs_single = single step / this step`` is the number the serving literature
quotes (S-LoRA, Sheng et al. 2023; peft's test bounds a mixed batch at under 2x the time of a
single-adapter one, i.e. ``vs_single > 0.5``).
"""

from __future__ import annotations

import statistics
import time

from ...errors import SpecError

__all__ = ["mixed_throughput", "default_ks"]


def default_ks(n_adapters: int, rows: int) -> tuple[int, ...]:
    """1, 2, 4, 8, … up to the adapters there are and the rows to spread them over, and that
    number itself (3 adapters: ``(1, 2, 3)``)."""
    top = min(n_adapters, rows)
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= top]
    return tuple(ks + ([top] if top not in ks else []))


def _step(model, tokenizer, prompts, adapters, max_new_tokens: int) -> tuple[float, str]:
    """(seconds per decoding step, the batch mode :func:`lora_lab.generate` chose)."""
    from .stream import generate

    t0 = time.perf_counter()
    res = generate(model, tokenizer, prompts, adapter=adapters, max_new_tokens=max_new_tokens)
    return ((time.perf_counter() - t0) / max(1, max(r.n_tokens for r in res)),
            res[0].settings["batch_mode"])


def mixed_throughput(model, tokenizer, prompts, adapters, ks=None, *, max_new_tokens: int = 8,
                     repeats: int = 3, base: bool = True, label: str | None = None) -> list[dict]:
    """Time one batch of ``prompts`` spread over K of ``adapters`` (names of loaded adapters) for
    each K in ``ks`` (default :func:`default_ks`), against all rows on ``adapters[0]`` and, with
    ``base``, on the base model (protocol: the module docstring).

    Returns one record (a dict) per side, in order: ``way`` (``"single"``, ``"mixed"``, ``"base"``),
    ``adapters`` (K: 1 for single, 0 for the base), ``rows``, ``ms_per_step``, ``tokens_per_s``,
    ``vs_single``, ``batch_mode`` (what :func:`lora_lab.generate` did), ``label``.  K = 1 is the
    single side itself.  Draw them with :func:`lora_lab.viz.serving.throughput_figure`.
    """
    prompts, adapters = list(prompts), list(adapters)
    rows = len(prompts)
    ks = tuple(ks) if ks is not None else default_ks(len(adapters), rows)
    if not adapters or not ks or min(ks) < 1 or max(ks) > min(len(adapters), rows):
        raise SpecError("mixed_throughput", "ks", ks,
                        f"each K must be in 1..{min(len(adapters), rows)} (adapters given: "
                        f"{len(adapters)}, rows: {rows})",
                        "load more adapters or pass more prompts, or ask for smaller K")
    ways = {("single", 1): [adapters[0]] * rows}
    ways.update({("mixed", k): [adapters[i % k] for i in range(rows)] for k in ks if k > 1})
    if base:
        ways[("base", 0)] = [None] * rows
    seconds: dict[tuple, list[float]] = {w: [] for w in ways}
    modes = {}
    for w, names in ways.items():                                                 # warm-up
        modes[w] = _step(model, tokenizer, prompts, names, max_new_tokens)[1]
    for _ in range(repeats):
        for w, names in ways.items():
            seconds[w].append(_step(model, tokenizer, prompts, names, max_new_tokens)[0])
    step = {w: statistics.median(s) for w, s in seconds.items()}
    single = step[("single", 1)]
    records = []
    for (way, k), s in step.items():
        records.append({"way": way, "adapters": k, "rows": rows, "ms_per_step": s * 1e3,
                        "tokens_per_s": rows / s, "vs_single": single / s,
                        "batch_mode": modes[(way, k)], "label": label})
        if way == "single" and 1 in ks:
            records.append(dict(records[-1], way="mixed"))       # K = 1 is the single side itself
    return records
