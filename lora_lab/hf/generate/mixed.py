"""Many prompts in one batch, each row with its own adapter: how one base model serves many tasks.

A LoRA layer computes ``y = W x + s·B_k A_k x`` for adapter k (Hu et al. 2021, §4.1).  The base term
``W x`` is the same for every adapter, so a batch whose rows want different adapters can run the
base once over all rows and add each adapter's low-rank term to its own rows only::

    Y = X Wᵀ                                     (batch × T × out: one big matmul for every row)
    Y[rows_k] += s_k · (X[rows_k] A_kᵀ) B_kᵀ     (per adapter k: two thin matmuls, rank r)

peft's mixed-batch forward (``adapter_names=[...]`` with ``"__base__"`` for the base model) runs that
second line as a Python loop over the adapters, which on a small model costs more than the matmuls
(4 adapters: 0.47 of single-adapter throughput on builtin:tiny).  So lora_lab stacks the batch's
adapters along the rank once per call and computes every row's LoRA term in two matmuls and a mask,
whatever the number of adapters (:mod:`~lora_lab.hf.generate.routing`; the idea of Punica's and
S-LoRA's batched LoRA kernels, Sheng et al. 2023: thousands of adapters at close to
single-adapter throughput); peft's loop remains for what cannot be stacked (``modules_to_save``,
non-Linear LoRA layers), and ``settings["batch_note"]`` then says why.  :func:`generate_batch` runs
it inside transformers' ``model.generate``: the prompts are left-padded into one batch (so every row's next
token sits in the last column), there is one forward pass per new token for the whole batch, the KV
cache holds every row, and a row that reaches its stop token (eos, or the chat template's end of
turn, :func:`~lora_lab.hf.generate.decode.stop_token_ids`) is finished on its own while the others go on.

**The oracle.**  Greedy decoding of a row in the mixed batch gives, token for token, what that prompt
gives alone with that adapter (``tests/hf/generate/test_mixed_batch.py`` checks it on builtin:tiny and
SmolLM2-135M, ``test_stacked_routing.py`` for mixed ranks, rsLoRA, 4-bit layers and peft's loop).

**Which adapters can mix.**  Plain LoRA and rsLoRA (any rank, any targets) and the base.  peft refuses
DoRA in a mixed batch (its magnitude vector rescales the whole ``W + s·BA`` column, so it is not an
added term), IA3 has no mixed forward, and prompt / prefix tuning change the input sequence itself.
So do adapters that train whole modules (``modules_to_save``) mixed with adapters that have no copy
of those modules (peft's loop looks every row's adapter up in them).  For those, lora_lab routes the
rows itself: the rows are grouped by adapter and each group runs as
its own batch (one forward per token per group), which gives the same tokens; the result's
``settings["batch_mode"]`` says ``"grouped"`` and ``settings["batch_note"]`` says why.
"""

from __future__ import annotations

import contextlib
import time

import torch

from ...errors import AdapterError, SpecError
from .._peft import is_peft
from ..adapters.switch import ACTIVE, active_adapter, merged_adapters, using_adapter
from ..model.lm_head import keep_head_input_contiguous
from .batch import left_pad
from .decode import complete, is_prompt_learning, stop_requested
from .routing import peft_mix_reason, stack_reason, stacked_lora

__all__ = ["BASE", "generate_batch", "is_batch", "mixable", "plan_rows"]

BASE = "__base__"
"""peft's name for "no adapter" in ``adapter_names``."""


def is_batch(prompt) -> bool:
    """True for a list of prompts: a list whose items are strings, token-id lists or chat-message
    lists.  (A list of ints is one tokenized prompt; a list of dicts is one chat.)"""
    return (isinstance(prompt, (list, tuple)) and bool(prompt)
            and all(isinstance(p, (str, list, tuple)) for p in prompt))


def mixable(model, name: str | None) -> str | None:
    """None when adapter ``name`` can share a batch with other adapters through peft's mixed
    forward; else the reason it cannot."""
    if name is None:
        return None
    cfg = model.peft_config[name]
    kind = str(cfg.peft_type).split(".")[-1]
    if getattr(cfg, "is_prompt_learning", False):
        return f"{name!r} is {kind.lower()}: its virtual tokens change the input sequence itself"
    if kind != "LORA":
        return f"{name!r} is {kind}, which has no mixed-batch forward in peft"
    if getattr(cfg, "use_dora", False):
        return (f"{name!r} is DoRA: its magnitude rescales W + s·BA column by column, so it is "
                "not a term added to the shared base output (peft refuses it in a mixed batch)")
    return None


def plan_rows(model, adapters, n: int) -> list[str | None]:
    """The adapter of each of ``n`` rows (None: the base), checked before anything runs.

    ``adapters`` is one value for every row (``ACTIVE``, None or a name) or a list of length ``n``.
    Raises :class:`AdapterError` for a length mismatch, a name that is not loaded (listing the
    loaded ones), a merged model (rows could not run on clean weights) or a model in training mode.
    """
    per_row = isinstance(adapters, (list, tuple))
    if per_row and len(adapters) != n:
        raise AdapterError(f"adapter= lists {len(adapters)} adapters for {n} prompts.",
                           "give one adapter name (or None for the base) per prompt, in order")
    names = list(adapters) if per_row else [adapters] * n
    loaded = sorted(model.peft_config) if is_peft(model) else []
    for k, a in enumerate(names):
        if a is ACTIVE:
            names[k] = active_adapter(model) if is_peft(model) else None
        elif a is not None and (not isinstance(a, str) or a not in loaded):
            raise AdapterError(f"Row {k} asks for adapter {a!r}, which is not loaded "
                               f"(loaded: {loaded or 'none'}).",
                               f"use one of {loaded + [None]} (None is the base model), or load it "
                               "first with lora_lab.load_adapter(model, folder)")
    if len(set(names)) > 1:
        merged = merged_adapters(model)
        if merged:
            raise AdapterError(f"Adapter(s) {merged} are merged into the base weights, so rows cannot "
                               "each use their own adapter on clean weights.",
                               "unmerge first: lora_lab.unmerge_adapter(model)")
        if model.training:
            raise AdapterError("The model is in training mode: dropout would make each row's output "
                               "random, and peft refuses per-row adapters while training.",
                               "call model.eval() before generating (model.train() to resume training)")
    return names


class _RowsHook:
    """A ``StoppingCriteria`` for a (sub-)batch: records when each row makes its first token and its
    stop token, streams ``on_token(row, piece)`` and honours the stop flag for every row."""

    def __init__(self, tokenizer, rows: list[int], n_prompt: int, eos: set[int], on_token, stop,
                 t0: float, log: dict):
        self.tok, self.rows, self.n_prompt, self.eos = tokenizer, rows, n_prompt, eos
        self.on_token, self.stop, self.t0, self.log = on_token, stop, t0, log
        self.stopped = False
        self.emitted = {r: "" for r in rows}

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        now = time.perf_counter() - self.t0
        new = input_ids[:, self.n_prompt:].tolist()
        for j, r in enumerate(self.rows):
            if r in self.log["done"]:
                continue
            self.log["first"].setdefault(r, now)
            if new[j][-1] in self.eos:
                self.log["done"][r] = now
            if self.on_token is not None:
                text = self.tok.decode(new[j], skip_special_tokens=True)
                if text.startswith(self.emitted[r]) and not text.endswith("\ufffd"):
                    piece, self.emitted[r] = text[len(self.emitted[r]):], text
                    if piece:
                        self.on_token(r, piece)
        self.stopped = self.stopped or stop_requested(self.stop)
        return torch.full((input_ids.shape[0],), self.stopped, dtype=torch.bool, device=input_ids.device)


def _run(model, tokenizer, ids_list, rows, names, config, hook_args, routing=None):
    """Generate ``rows`` (indices into ``ids_list``) as one left-padded batch; return
    ``{row: new token ids}`` (cut after the row's first stop token).  ``routing``: None (the active
    adapter for every row), ``"stacked"`` (:func:`~.routing.stacked_lora`) or ``"peft"`` (peft's
    ``adapter_names``)."""
    device = next(model.parameters()).device
    ids, mask = (t.to(device) for t in left_pad([ids_list[r] for r in rows], config.pad_token_id))
    hook = _RowsHook(tokenizer, rows, ids.shape[1], *hook_args)
    kwargs = {"generation_config": config}
    per_row = contextlib.nullcontext()
    if routing == "stacked":
        per_row = stacked_lora(model, [names[r] for r in rows])
    elif routing == "peft":
        kwargs["adapter_names"] = [BASE if names[r] is None else names[r] for r in rows]
    with per_row:
        out = complete(model, ids, mask, max_new_tokens=config.max_new_tokens,
                       eos_ids=config.eos_token_id or [], generate_kwargs=kwargs,
                       greedy=not config.do_sample, temperature=config.temperature or 1.0,
                       top_p=config.top_p or 1.0, step_hook=hook)
    eos, got = hook.eos, {}
    for j, r in enumerate(rows):
        new = out[j, ids.shape[1]:].tolist()
        cut = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
        got[r] = new[:cut]
    return got, hook.stopped


def _groups(model, rows: list[int], ids_list) -> list[list[int]]:
    """Rows that can share one padded batch: all of them, or, for prompt learning (decoded without a
    cache on unpadded rows), rows of equal prompt length."""
    if not is_prompt_learning(model):
        return [rows]
    by_len: dict[int, list[int]] = {}
    for r in rows:
        by_len.setdefault(len(ids_list[r]), []).append(r)
    return list(by_len.values())


@torch.no_grad()
def generate_batch(model, tokenizer, ids_list: list[list[int]], names: list[str | None], config, *,
                   on_token=None, stop=None, seed: int | None = None) -> tuple[dict, dict, str, str]:
    """Complete the tokenized prompts ``ids_list``, row k with adapter ``names[k]`` (from
    :func:`plan_rows`), under the transformers ``GenerationConfig`` ``config``.

    Returns ``(tokens, timing, mode, note)``: ``tokens[k]`` the new ids of row k, ``timing`` the
    seconds to each row's first token (``"first"``) and stop token (``"done"``) and the call's total
    (``"total"``) and stop flag (``"stopped"``), ``mode`` one of ``"uniform"`` (one adapter for all
    rows: one batch), ``"mixed"`` (per-row routing, one batch: stacked adapters, or peft's loop with
    ``note`` saying why) or ``"grouped"`` (one batch per adapter, for adapters that cannot mix;
    ``note`` says why).
    """
    keep_head_input_contiguous(model)
    eos = set(config.eos_token_id or [])
    log: dict = {"first": {}, "done": {}}
    t0 = time.perf_counter()
    hook_args = (eos, on_token, stop, t0, log)
    unique = list(dict.fromkeys(names))
    reasons = [r for r in (mixable(model, n) for n in unique) if r] if len(unique) > 1 else []
    routing = None
    if len(unique) > 1 and not reasons:   # stacked along the rank (routing.py) where it can, else peft's loop
        slow = stack_reason(model, names)
        routing = "peft" if slow else "stacked"
        reasons = [f"peft's per-adapter mixed forward: {slow}"] if slow else []
        if slow and peft_mix_reason(model, names):
            routing, reasons = None, [peft_mix_reason(model, names)]
    mode = "uniform" if len(unique) == 1 else "mixed" if routing else "grouped"
    plan = ([(unique[0], list(range(len(names))), None)] if mode == "uniform" else
            [(ACTIVE if routing == "stacked" else next(n for n in unique if n is not None),
              list(range(len(names))), routing)]
            if mode == "mixed" else
            [(n, [k for k, m in enumerate(names) if m == n], None) for n in unique])
    device = next(model.parameters()).device
    rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=seed is not None)
    tokens: dict[int, list[int]] = {}
    stopped = False
    was_training = model.training
    model.eval()
    try:
        with rng:
            if seed is not None:
                torch.manual_seed(seed)
            for name, rows, how in plan:
                with using_adapter(model, name):
                    for part in _groups(model, rows, ids_list):
                        if stopped:
                            tokens.update({r: [] for r in part})
                            continue
                        got, stopped = _run(model, tokenizer, ids_list, part, names, config,
                                            hook_args, routing=how)
                        tokens.update(got)
    finally:
        model.train(was_training)
    log["total"], log["stopped"] = time.perf_counter() - t0, stopped
    return tokens, log, mode, "; ".join(reasons)


def check_prompts(prompts) -> None:
    if not prompts:
        raise SpecError("generate", "prompt", prompts, "must not be an empty list",
                        "pass at least one prompt")
