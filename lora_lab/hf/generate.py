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

**Prompts** are encoded by :func:`lora_lab.hf.data.encode_prompt`, exactly as training saw them
(chat template, BOS), so an adapter is asked in the format it learned.  A list of token ids is
used as given.

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

from ..errors import AdapterError, SpecError
from ..specs import DataSpec

__all__ = ["generate", "stream_generate", "switch_adapter", "GenerationResult", "ACTIVE",
           "encode_for_generation", "merged_adapters"]


class _Active:
    def __repr__(self) -> str:
        return "ACTIVE"


ACTIVE = _Active()
"""``adapter=ACTIVE``: generate with the model exactly as it is now (its active adapter, if any)."""


@dataclass(frozen=True)
class GenerationResult:
    """One completion: the new text and tokens, why it ended, and how fast it ran.

    ``finish_reason`` is ``"eos"`` (the model ended its answer), ``"length"`` (``max_new_tokens``
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
    from .data import encode_prompt

    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    if isinstance(prompt, str) and not prompt.strip():
        raise SpecError("generate", "prompt", prompt, "must not be empty", "type a prompt")
    if not isinstance(prompt, (str, list, tuple)) or not prompt:
        raise SpecError("generate", "prompt", prompt,
                        "must be a string, a list of chat messages or a list of token ids",
                        "pass a prompt such as 'reverse abc'")
    return encode_prompt(tokenizer, prompt, spec or DataSpec())


# ------------------------------------------------------------------------------ adapters
def _is_peft(model) -> bool:
    import peft

    return isinstance(model, peft.PeftModel)


def merged_adapters(model: nn.Module) -> list[str]:
    """Names of adapters currently merged into the base weights (empty for a plain model)."""
    if not _is_peft(model):
        return []
    names: set[str] = set()
    for m in model.modules():
        if getattr(m, "merged", False):
            names.update(getattr(m, "merged_adapters", []) or [])
    return sorted(names)


def _routing(model) -> tuple[list, dict] | None:
    """The model's adapter layers and each adapter's parameters, cached until an adapter is added
    or deleted; None where the fast switch does not apply (prompt learning, ``modules_to_save``)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    configs = tuple(model.peft_config.items())
    key = tuple((n, id(c)) for n, c in configs)       # the cache holds the configs: ids stay unique
    cached = model.__dict__.get("_lora_lab_routing")
    if cached is not None and cached[0] == key:
        return cached[2]
    routing = None
    if not any(c.is_prompt_learning for _, c in configs):
        mods = list(model.modules())
        if not any(isinstance(m, AuxiliaryTrainingWrapper) for m in mods):
            layers = [m for m in mods if isinstance(m, BaseTunerLayer)]
            params: dict[str, list] = {n: [] for n, _ in configs}
            for layer in layers:
                for attr in layer.adapter_layer_names:
                    for n, sub in getattr(layer, attr).items():
                        ps = [sub] if isinstance(sub, nn.Parameter) else list(sub.parameters())
                        params.setdefault(n, []).extend(ps)
            routing = (layers, params)
    model.__dict__["_lora_lab_routing"] = (key, configs, routing)
    return routing


def switch_adapter(model: nn.Module, name: str | None) -> None:
    """Make ``name`` the active adapter (None: the base model), as :func:`lora_lab.set_adapter`
    does, in time proportional to the adapter layers.

    peft's ``set_adapter`` walks the whole module tree (twice) and, per layer, every loaded
    adapter's sub-modules, so a switch costs milliseconds and grows with the number of adapters
    (8 adapters, shared 2-core CPU: 3–8 ms on ``builtin:tiny`` and 27–37 ms on a 1B-shaped Llama,
    against 0.1–0.2 ms and 1.3 ms here; ``benchmarks/switch.py``).
    A switch needs only (1) the routing: each adapter layer's active adapter
    (``y = W x + s·B_name A_name x``) or "disabled" (``y = W x``), and (2) peft's trainability rule:
    the active adapter's parameters require grad, the others do not.  This sets exactly those, from
    a list of layers and parameters cached until an adapter is added or deleted.  Merged layers,
    prompt learning and ``modules_to_save`` take peft's full path.
    """
    from .adapters import set_adapter

    if not _is_peft(model):
        if name is None:
            return
        raise AdapterError(f"This model has no adapters, so adapter {name!r} cannot be switched to.",
                           "load one with lora_lab.load_adapter")
    if name is not None and name not in model.peft_config:
        raise AdapterError(f"There is no adapter named {name!r}.",
                           f"pass one of {sorted(model.peft_config)}, or None for the base model")
    routing = _routing(model)
    if routing is None or any(m.merged for m in routing[0]):
        set_adapter(model, name)
        return
    layers, params = routing
    for m in layers:          # plain attributes: skip nn.Module.__setattr__'s checks (18x faster)
        m.__dict__["_disable_adapters"] = name is None
        if name is not None:
            m.__dict__["_active_adapter"] = [name]
    for n, ps in params.items():
        for p in ps:
            if p.requires_grad != (n == name):
                p.requires_grad_(n == name)
    if name is not None:
        model.active_adapter = model.base_model.active_adapter = name
    model._lora_lab_disabled = name is None


class _UseAdapter:
    """Context: run ``model`` with adapter ``name`` (None: the base model), then switch back."""

    def __init__(self, model, name):
        self.model, self.name, self._prev, self._ctx = model, name, ACTIVE, None

    def __enter__(self):
        from .adapters import active_adapter

        if self.name is ACTIVE or (self.name is None and not _is_peft(self.model)):
            return self
        current = active_adapter(self.model) if _is_peft(self.model) else None
        if self.name == current:
            return self
        merged = merged_adapters(self.model)
        if merged:
            raise AdapterError(f"Adapter(s) {merged} are merged into the base weights, so "
                               f"adapter={self.name!r} cannot run on clean weights.",
                               "unmerge first: lora_lab.unmerge_adapter(model)")
        if self.name is None and _routing(self.model) is None:   # prefix/prompt tuning
            from .adapters import disabled_adapters

            self._ctx = disabled_adapters(self.model)
            self._ctx.__enter__()
            return self
        switch_adapter(self.model, self.name)
        self._prev = current
        return self

    def __exit__(self, *exc):
        if self._ctx is not None:
            self._ctx.__exit__(*exc)
        elif self._prev is not ACTIVE:
            switch_adapter(self.model, self._prev)
        return False


# ------------------------------------------------------------------------------ the step hook
def _stop_requested(stop) -> bool:
    if stop is None:
        return False
    if hasattr(stop, "is_set"):
        return stop.is_set()
    return bool(stop())


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


def _eos_ids(model, tokenizer) -> list[int]:
    ids = []
    for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        for i in source if isinstance(source, (list, tuple)) else [source]:
            if i is not None and i not in ids:
                ids.append(int(i))
    return ids


def _generation_config(model, tokenizer, max_new_tokens, greedy, temperature, top_p):
    from transformers import GenerationConfig

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kw = dict(max_new_tokens=max_new_tokens, do_sample=not greedy, pad_token_id=pad,
              eos_token_id=_eos_ids(model, tokenizer) or None, use_cache=True)
    if not greedy:
        kw.update(temperature=float(temperature), top_p=float(top_p), top_k=0)
    return GenerationConfig(**kw)


def _run(model, input_ids, config, hook, greedy, temperature, top_p) -> torch.Tensor:
    """``model.generate`` with the step hook; prompt/prefix tuning without a cache (hf/decode.py)."""
    from .decode import decode_without_cache, is_prompt_learning

    if is_prompt_learning(model):
        return decode_without_cache(model, input_ids, config.max_new_tokens, config.eos_token_id or [],
                                    greedy=greedy, temperature=temperature, top_p=top_p,
                                    step_hook=hook)
    return model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                          generation_config=config, stopping_criteria=[hook])


# ------------------------------------------------------------------------------ public
@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompt, *, max_new_tokens: int = 64, greedy: bool = True,
             temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
             adapter=ACTIVE, on_token: Callable[[str], None] | None = None, stop=None,
             spec: DataSpec | None = None) -> GenerationResult:
    """Complete ``prompt`` token by token; return a :class:`GenerationResult`.

    ``on_token(piece)`` receives each new piece of text as it is made (the pieces concatenate to
    ``result.text``).  ``stop`` is a ``threading.Event`` or a zero-argument callable; once it is set
    (e.g. by a Stop button, or by ``on_token`` itself) generation ends after the current token and
    the tokens so far are returned with ``finish_reason="stopped"``.  ``seed`` makes sampling
    reproducible without touching the global random state.  The model's train/eval mode and its
    active adapter are restored afterwards.
    """
    _check_settings(max_new_tokens, greedy, temperature, top_p)
    ids = encode_for_generation(tokenizer, prompt, spec)
    device = next(model.parameters()).device
    config = _generation_config(model, tokenizer, max_new_tokens, greedy, temperature, top_p)
    eos = set(config.eos_token_id or [])
    hook = _StepHook(tokenizer, len(ids), on_token, stop, eos)
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [],
                                enabled=seed is not None)
    try:
        with _UseAdapter(model, adapter) as use, rng:
            if seed is not None:
                torch.manual_seed(seed)
            from .adapters import active_adapter

            name = active_adapter(model) if use.name is ACTIVE else use.name
            t0 = time.perf_counter()
            out = _run(model, input_ids, config, hook, greedy, temperature, top_p)
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
