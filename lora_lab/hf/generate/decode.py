"""Decoding for prompt-learning adapters (prompt tuning, prefix tuning), without a KV cache.

With peft 0.21 and transformers 5.24, ``model.generate`` is wrong for these methods: with the KV
cache, prompt tuning's tokens after the first come out wrong and prefix tuning's virtual keys and
values are dropped (the base model's output comes back); with ``use_cache=False`` prefix tuning still
differs from the forward pass it was trained with.  The forward pass itself is right, so these
adapters are decoded by re-running the whole sequence at every step:

    x ← prompt;  repeat:  logits = model(x)[:, -1];  x ← [x, pick(logits)]   until EOS or the limit

That costs O(T²) positions instead of O(T), which is nothing for the short completions of tasks and
demos.  LoRA, DoRA and IA3 keep using ``model.generate`` (cache and all).  :func:`complete` is the
one place that chooses between the two; streamed generation (:mod:`.stream`) and batched greedy
generation (:mod:`.batch`) both decode through it.

**Where an answer stops.**  :func:`stop_token_ids` is the one list of tokens that end a completion:
the chat template's end-of-turn token (``<|im_end|>`` for ChatML, see
:mod:`lora_lab.hf.data.turns`), the tokenizer's eos and the model's ``generation_config`` eos ids.
A base model with a ChatML template has eos ``<|endoftext|>``; stopping on eos alone would let it
write past ``<|im_end|>`` into an invented next turn.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = ["is_prompt_learning", "decode_without_cache", "complete", "pad_token_id", "stop_requested",
           "stop_token_ids"]


def is_prompt_learning(model: nn.Module) -> bool:
    """True when the active adapter adds virtual tokens (prompt or prefix tuning, p-tuning)."""
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def _pick(logits: torch.Tensor, greedy: bool, temperature: float, top_p: float) -> torch.Tensor:
    """The next token per row: argmax, or a draw from the top-p nucleus of softmax(logits / T)."""
    if greedy:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    keep = sorted_p.cumsum(-1) - sorted_p < top_p  # the smallest set reaching top_p (first always)
    sorted_p = sorted_p * keep
    choice = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1)
    return order.gather(-1, choice).squeeze(-1)


@torch.no_grad()
def decode_without_cache(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
                         eos_ids, *, greedy: bool = True, temperature: float = 1.0,
                         top_p: float = 1.0,
                         step_hook: Callable[[torch.Tensor], torch.Tensor] | None = None
                         ) -> torch.Tensor:
    """Complete equal-length prompts ``input_ids`` (batch × T, no padding); return batch × (T + n).

    A row that has produced an EOS is filled with EOS from then on.  ``step_hook(ids)`` is called
    after each new token, like a transformers ``StoppingCriteria``; when it returns all-True the
    decoding ends.
    """
    eos = torch.tensor(sorted(eos_ids) or [-1], device=input_ids.device)
    x = input_ids
    done = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for _ in range(max_new_tokens):
        logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[:, -1].float()
        nxt = _pick(logits, greedy, temperature, top_p)
        nxt = torch.where(done, eos[0], nxt)
        x = torch.cat([x, nxt[:, None]], dim=1)
        done |= torch.isin(nxt, eos)
        if bool(done.all()) or (step_hook is not None and bool(step_hook(x).all())):
            break
    return x


def stop_requested(stop) -> bool:
    """True when ``stop`` (None, a ``threading.Event`` or a zero-argument callable) asks to stop."""
    if stop is None:
        return False
    if hasattr(stop, "is_set"):
        return stop.is_set()
    return bool(stop())


def pad_token_id(tokenizer) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its EOS (many causal LMs have none)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def stop_token_ids(model: nn.Module, tokenizer, spec=None) -> list[int]:
    """The ids that end a completion, in order: the template's end of turn and eos
    (:func:`lora_lab.hf.data.turns.end_of_turn_ids` under ``spec``, default ``DataSpec()``), then the
    model's ``generation_config.eos_token_id`` (an int or a list)."""
    from ...specs import DataSpec
    from ..data.turns import end_of_turn_ids

    ids = end_of_turn_ids(tokenizer, spec or DataSpec())
    source = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for i in source if isinstance(source, (list, tuple)) else [source]:
        if i is not None and int(i) not in ids:
            ids.append(int(i))
    return ids


def complete(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
             max_new_tokens: int, eos_ids, generate_kwargs: dict, greedy: bool = True,
             temperature: float = 1.0, top_p: float = 1.0,
             step_hook: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Complete ``input_ids`` (batch × T, left-padded where ``attention_mask`` is 0); return
    batch × (T + n).

    Prompt and prefix tuning: :func:`decode_without_cache` (the rows must be unpadded, equal length).
    Everything else: ``model.generate(input_ids, attention_mask, **generate_kwargs)`` with the KV
    cache; ``generate_kwargs`` carry the settings (a ``generation_config`` or plain keywords) and
    ``step_hook`` becomes a ``StoppingCriteria``.
    """
    if is_prompt_learning(model):
        return decode_without_cache(model, input_ids, max_new_tokens, eos_ids, greedy=greedy,
                                    temperature=temperature, top_p=top_p, step_hook=step_hook)
    return model.generate(input_ids=input_ids, attention_mask=attention_mask,
                          stopping_criteria=[step_hook] if step_hook is not None else None,
                          **generate_kwargs)
