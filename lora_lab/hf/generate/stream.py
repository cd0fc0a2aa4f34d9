"""Streamed, stoppable text generation with whichever adapter you choose (or none).

A causal LM generates one token at a time: token t+1 is chosen from the logits at position t, and
the keys and values of every earlier position are kept in a cache (the *KV cache*), so each new
step runs the model on one position only, costing O(T) attention instead of O(T²) recomputation.
This module runs transformers' own ``model.generate`` (KV cache, greedy or sampling) and hooks one
callback into every decoding step:

* **Greedy** picks ``argmax`` of the logits; deterministic, and what tests compare.
* **Sampling** divides the logits by ``temperature`` (< 1 sharpens, > 1 flattens), keeps the
  smallest set of tokens whose probability adds up to ``top_p`` (nucleus sampling, Holtzman et al.
  2020, §3.1) and draws from it.  top-k is switched off so that the two controls mean what they say.

**Streaming and stopping.**  The per-step hook is a ``StoppingCriteria``: transformers calls it after
token k is appended and before the next forward pass.  It hands token k to ``on_token`` (as the new
piece of *text*, decoded from all tokens so far, so multi-byte characters are never split) and then
reads the ``stop`` flag: a stop requested while token k is handled ends generation with exactly k
tokens, which are returned.  :func:`stream_generate` wraps this as a Python generator (the model runs
on a worker thread; leaving the loop early stops it).

**Prompts** are encoded by :func:`lora_lab.hf.data.prepare.encode_prompt`, exactly as training
saw them (chat template, BOS), so an adapter is asked in the format it learned.  A list of token
ids is used as given.

**Which adapter.**  ``adapter=ACTIVE`` (default) runs the model as it is; ``adapter=None`` runs the
base model (adapters disabled for this call only, exactly the base outputs); ``adapter="name"``
switches to that adapter for this call and switches back afterwards.  Switching is
:func:`switch_adapter`: the already loaded adapter layers are re-routed, nothing is reloaded or
merged, in microseconds per layer.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from ...errors import SpecError
from ...specs import DataSpec
from ..adapters.switch import ACTIVE, active_adapter, using_adapter
from .decode import complete, pad_token_id, stop_requested, stop_token_ids

__all__ = ["generate", "stream_generate", "GenerationResult", "encode_for_generation"]


@dataclass(frozen=True)
class GenerationResult:
    """One completion: the new text and tokens, why it ended, and how fast it ran.

    ``finish_reason`` is ``"eos"`` (the model ended its answer: eos or the chat template's end-of-turn
    token, see :func:`~lora_lab.hf.generate.decode.stop_token_ids`), ``"length"`` (``max_new_tokens``
    reached) or ``"stopped"`` (the stop flag was set).  ``tokens_per_s`` counts new tokens over the
    whole call (prefill included); ``first_token_s`` is the latency until the first new token.
    ``adapter`` is the adapter that generated it (``None`` for the base model).
    """

    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    finish_reason: str
    seconds: float
    first_token_s: float
    adapter: str | None
    settings: dict = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tokens_per_s(self) -> float:
        return self.n_tokens / self.seconds if self.seconds > 0 else 0.0

    def __repr__(self) -> str:
        text = self.text if len(self.text) <= 60 else self.text[:57] + "..."
        return (f"GenerationResult({text!r}, adapter={self.adapter!r}, tokens={self.n_tokens}, "
                f"finish={self.finish_reason}, {self.tokens_per_s:.1f} tok/s)")


# ------------------------------------------------------------------------------ validation
def _check_settings(max_new_tokens, greedy, temperature, top_p) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise SpecError("generate", "max_new_tokens", max_new_tokens, "must be an integer >= 1",
                        "pass max_new_tokens=64")
    if not greedy:
        if not isinstance(temperature, (int, float)) or not temperature > 0:
            raise SpecError("generate", "temperature", temperature, "must be a number > 0",
                            "pass temperature=0.7, or greedy=True for deterministic output")
        if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise SpecError("generate", "top_p", top_p, "must be in (0, 1]",
                            "pass top_p=0.9 (1.0 keeps every token)")


def encode_for_generation(tokenizer, prompt, spec: DataSpec | None = None) -> list[int]:
    """Prompt token ids: a string or chat messages through ``encode_prompt`` (as training does), or
    a list of ints used as given."""
    from ..data.prepare import encode_prompt

    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    if isinstance(prompt, str) and not prompt.strip():
        raise SpecError("generate", "prompt", prompt, "must not be empty", "type a prompt")
    if not isinstance(prompt, (str, list, tuple)) or not prompt:
        raise SpecError("generate", "prompt", prompt,
                        "must be a string, a list of chat messages or a list of token ids",
                        "pass a prompt such as 'reverse abc'")
    return encode_prompt(tokenizer, prompt, spec or DataSpec())


# ------------------------------------------------------------------------------ the step hook
_stop_requested = stop_requested


class _StepHook:
    """A ``StoppingCriteria`` that streams each new token's text and honours the stop flag."""

    def __init__(self, tokenizer, n_prompt: int, on_token, stop, eos_ids: set[int]):
        self.tokenizer, self.n_prompt, self.on_token, self.stop = tokenizer, n_prompt, on_token, stop
        self.eos_ids = eos_ids
        self.ids: list[int] = []
        self.emitted = ""
        self.first_token_at: float | None = None
        self.stopped = False

    def _piece(self, final: bool = False) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.startswith(self.emitted) or (text.endswith("\ufffd") and not final):
            return ""      # an incomplete multi-byte character: wait for the next token
        piece, self.emitted = text[len(self.emitted):], text
        return piece

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.ids = input_ids[0, self.n_prompt:].tolist()
        piece = self._piece()
        if self.on_token is not None and piece:
            self.on_token(piece)
        self.stopped = self.stopped or (_stop_requested(self.stop) and self.ids[-1] not in self.eos_ids)
        return torch.full((input_ids.shape[0],), self.stopped, dtype=torch.bool,
                          device=input_ids.device)


def _generation_config(model, tokenizer, max_new_tokens, greedy, temperature, top_p, spec):
    """Settings for ``model.generate``; it stops on every id of :func:`stop_token_ids` (the chat
    template's end of turn as well as eos)."""
    from transformers import GenerationConfig

    kw = dict(max_new_tokens=max_new_tokens, do_sample=not greedy, pad_token_id=pad_token_id(tokenizer),
              eos_token_id=stop_token_ids(model, tokenizer, spec) or None, use_cache=True)
    if not greedy:
        kw.update(temperature=float(temperature), top_p=float(top_p), top_k=0)
    return GenerationConfig(**kw)


# ------------------------------------------------------------------------------ public
@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompt, *, max_new_tokens: int = 64, greedy: bool = True,
             temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
             adapter=ACTIVE, on_token: Callable[[str], None] | None = None, stop=None,
             spec: DataSpec | None = None) -> GenerationResult | list[GenerationResult]:
    """Complete ``prompt`` token by token; return a :class:`GenerationResult`.

    **Many prompts at once.**  ``prompt`` may be a list of prompts; then a list of results comes
    back, one per prompt, in order, from one left-padded batch (one forward pass per token for all
    rows, KV cache).  ``adapter`` is then one value for every row, or a list with one adapter name
    (or None for the base) per prompt: each row runs through its own adapter
    (:mod:`lora_lab.hf.generate.mixed`), and a row's greedy tokens equal those of its prompt
    generated alone with its adapter.  ``on_token(row, piece)`` then also gets the row's index.

    ``on_token(piece)`` receives each new piece of text as it is made (the pieces concatenate to
    ``result.text``).  ``stop`` is a ``threading.Event`` or a zero-argument callable; once it is set
    (e.g. by a Stop button, or by ``on_token`` itself) generation ends after the current token and
    the tokens so far are returned with ``finish_reason="stopped"``.  ``seed`` makes sampling
    reproducible without touching the global random state.  The model's train/eval mode and its
    active adapter are restored afterwards.
    """
    _check_settings(max_new_tokens, greedy, temperature, top_p)
    from .mixed import is_batch

    if is_batch(prompt) or isinstance(adapter, (list, tuple)):
        return _generate_many(model, tokenizer, prompt, adapter, spec, on_token, stop, seed,
                              dict(max_new_tokens=max_new_tokens, greedy=greedy,
                                   temperature=temperature, top_p=top_p))
    ids = encode_for_generation(tokenizer, prompt, spec)
    device = next(model.parameters()).device
    config = _generation_config(model, tokenizer, max_new_tokens, greedy, temperature, top_p, spec)
    eos = set(config.eos_token_id or [])
    hook = _StepHook(tokenizer, len(ids), on_token, stop, eos)
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [],
                                enabled=seed is not None)
    try:
        with using_adapter(model, adapter) as use, rng:
            if seed is not None:
                torch.manual_seed(seed)
            name = active_adapter(model) if use.name is ACTIVE else use.name
            t0 = time.perf_counter()
            out = complete(model, input_ids, torch.ones_like(input_ids),
                           max_new_tokens=max_new_tokens, eos_ids=config.eos_token_id or [],
                           generate_kwargs={"generation_config": config}, greedy=greedy,
                           temperature=temperature, top_p=top_p, step_hook=hook)
            seconds = time.perf_counter() - t0
    finally:
        model.train(was_training)
    new = out[0, len(ids):].tolist()
    hook.ids = new
    tail = hook._piece(final=True)
    if on_token is not None and tail:
        on_token(tail)
    reason = ("eos" if new and new[-1] in eos else "stopped" if hook.stopped
              else "length")
    first = (hook.first_token_at - t0) if hook.first_token_at else seconds
    return GenerationResult(text=tokenizer.decode(new, skip_special_tokens=True),
                            token_ids=tuple(new), prompt_tokens=len(ids), finish_reason=reason,
                            seconds=seconds, first_token_s=first, adapter=name,
                            settings=dict(max_new_tokens=max_new_tokens, greedy=greedy,
                                          temperature=temperature, top_p=top_p, seed=seed))


def _generate_many(model, tokenizer, prompts, adapter, spec, on_token, stop, seed, settings):
    """:func:`generate` for a list of prompts (``adapter``: one value or one per prompt)."""
    from .mixed import check_prompts, generate_batch, is_batch, plan_rows

    if not is_batch(prompts):
        raise SpecError("generate", "prompt", prompts, "must be a list of prompts when adapter= is a "
                        "list (one adapter per prompt)",
                        "pass prompt=[p1, p2, ...] with adapter=[a1, a2, ...]")
    check_prompts(prompts)
    names = plan_rows(model, adapter, len(prompts))          # checks everything before any change
    ids_list = [encode_for_generation(tokenizer, p, spec) for p in prompts]
    config = _generation_config(model, tokenizer, settings["max_new_tokens"], settings["greedy"],
                                settings["temperature"], settings["top_p"], spec)
    tokens, log, mode, note = generate_batch(model, tokenizer, ids_list, names, config,
                                             on_token=on_token, stop=stop, seed=seed)
    eos = set(config.eos_token_id or [])
    out = []
    for k, ids in enumerate(ids_list):
        new = tokens[k]
        reason = ("eos" if new and new[-1] in eos else "stopped" if log["stopped"] else "length")
        seconds = log["done"].get(k, log["total"])
        out.append(GenerationResult(
            text=tokenizer.decode(new, skip_special_tokens=True), token_ids=tuple(new),
            prompt_tokens=len(ids), finish_reason=reason, seconds=seconds,
            first_token_s=log["first"].get(k, seconds), adapter=names[k],
            settings=dict(settings, seed=seed, batch_size=len(ids_list), batch_mode=mode,
                          batch_note=note)))
    return out


def stream_generate(model: nn.Module, tokenizer, prompt, **kwargs) -> Iterator[str]:
    """Yield the completion of ``prompt`` piece by piece (same arguments as :func:`generate`)::

        for piece in stream_generate(model, tok, "reverse abc"):
            print(piece, end="", flush=True)

    The model runs on a worker thread and hands pieces over a queue.  Breaking out of the loop sets
    the stop flag, so generation ends after the current token.  Errors are raised in the caller.
    """
    if "on_token" in kwargs:
        raise SpecError("stream_generate", "on_token", kwargs["on_token"],
                        "is used internally by the generator", "use generate(on_token=...) instead")
    from .mixed import is_batch

    if is_batch(prompt) or isinstance(kwargs.get("adapter"), (list, tuple)):
        raise SpecError("stream_generate", "prompt", prompt, "must be one prompt (a list of prompts "
                        "is generated as a batch)", "use generate(model, tok, prompts, adapter=[...], "
                        "on_token=lambda row, piece: ...) to follow a batch")
    user_stop = kwargs.pop("stop", None)
    stop = threading.Event()
    pieces: queue.Queue = queue.Queue()
    done = object()
    box: dict = {}

    def should_stop() -> bool:
        return stop.is_set() or _stop_requested(user_stop)

    def work():
        try:
            box["result"] = generate(model, tokenizer, prompt, on_token=pieces.put,
                                     stop=should_stop, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = exc
        finally:
            pieces.put(done)

    worker = threading.Thread(target=work, name="lora_lab-generate", daemon=True)
    worker.start()
    try:
        while (item := pieces.get()) is not done:
            yield item
    finally:
        stop.set()
        worker.join()
    if "error" in box:
        raise box["error"]
