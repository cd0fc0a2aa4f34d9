"""Greedy generation for many prompts at once, and exact-match accuracy on a task.

Rows are left-padded into batches and completed by ``model.generate`` (KV cache); prompt and
prefix tuning are decoded without a cache (:mod:`lora_lab.hf.generate.decode`).
"""

from __future__ import annotations

import torch

from ...errors import DataError
from ...specs import DataSpec
from ..data.prepare import encode_prompt
from ..model.lm_head import keep_head_input_contiguous
from .decode import complete, is_prompt_learning, pad_token_id, stop_token_ids

__all__ = ["generate_greedy", "task_completions", "task_accuracy"]


def left_pad(rows: list[list[int]], pad_id: int):
    """(ids, attention_mask), both (len(rows), longest): each row right-aligned after pad_id."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.as_tensor(r, dtype=torch.long)
        mask[i, T - len(r):] = 1
    return ids, mask


def _batches(prompt_ids: list[list[int]], batch_size: int, equal_length: bool):
    """Row indices, ``batch_size`` at a time: in order, or grouped by prompt length when the rows
    must not be padded (prompt learning is decoded without a cache, on unpadded rows)."""
    if not equal_length:
        groups = [list(range(len(prompt_ids)))]
    else:
        by_len: dict[int, list[int]] = {}
        for k, ids in enumerate(prompt_ids):
            by_len.setdefault(len(ids), []).append(k)
        groups = list(by_len.values())
    for rows in groups:
        for i in range(0, len(rows), batch_size):
            yield rows[i:i + batch_size]


def generate_greedy(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int,
                    batch_size: int = 64, *, spec: DataSpec | None = None) -> list[str]:
    """Greedy completions of tokenized prompts, in left-padded batches (``model.generate``, KV cache;
    prompt and prefix tuning are decoded without a cache, see :mod:`lora_lab.hf.generate.decode`).

    ``prompt_ids`` are token-id lists as training sees them (see
    :func:`lora_lab.hf.data.prepare.encode_prompt`).  Rows sharing a batch are padded on the left,
    so every row's last prompt token sits at the same position.  Stops a row at the chat template's
    end-of-turn token or EOS (:func:`lora_lab.hf.generate.decode.stop_token_ids` under ``spec``, the
    ``DataSpec`` the prompts were encoded with) and returns the decoded new text without special
    tokens.  The model's train/eval mode is restored afterwards.
    """
    keep_head_input_contiguous(model)  # else a bf16 CPU model copies its head per row (hf/model/lm_head.py)
    device = next(model.parameters()).device
    pad = pad_token_id(tokenizer)
    stop = stop_token_ids(model, tokenizer, spec)
    settings = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                    eos_token_id=stop)
    outputs: list[str] = [""] * len(prompt_ids)
    was_training = model.training
    model.eval()
    try:
        for part in _batches(prompt_ids, batch_size, equal_length=is_prompt_learning(model)):
            ids, mask = left_pad([prompt_ids[k] for k in part], pad)
            with torch.no_grad():
                out = complete(model, ids.to(device), mask.to(device),
                               max_new_tokens=max_new_tokens, eos_ids=stop,
                               generate_kwargs=settings)
            texts = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
            for k, text in zip(part, texts):
                outputs[k] = text
    finally:
        if was_training:
            model.train()
    return outputs


def task_accuracy(model, tokenizer, dataset, *, max_new_tokens: int | None = None,
                  batch_size: int = 32, spec=None) -> float:
    """Exact-match accuracy of greedy generation on ``dataset`` (``prompt``/``response`` rows).

    Each prompt is rendered and tokenized by :func:`lora_lab.hf.data.prepare.encode_prompt` — the
    same ids that training sees (chat template, BOS) — then completed greedily; a row counts when
    the completion, stripped of surrounding whitespace, equals the response.  ``max_new_tokens=None``
    allows the longest response plus one token (for EOS).  Neither the model nor the tokenizer is changed.
    """
    got, answers = _complete_rows(model, tokenizer, dataset, max_new_tokens, batch_size, spec)
    return sum(g.strip() == a for g, a in zip(got, answers)) / len(answers)


def task_completions(model, tokenizer, dataset, *, max_new_tokens: int | None = None,
                     batch_size: int = 32, spec=None) -> list[str]:
    """The greedy completion of every ``prompt`` of ``dataset``, stripped, in order: what
    :func:`task_accuracy` compares with the responses, for a before/after table or a check of your
    own (e.g. :func:`lora_lab.hf.data.chat_tasks.follows_format`)."""
    got, _ = _complete_rows(model, tokenizer, dataset, max_new_tokens, batch_size, spec)
    return [g.strip() for g in got]


def _complete_rows(model, tokenizer, dataset, max_new_tokens, batch_size, spec):
    spec = spec or DataSpec()
    for col in (spec.prompt_column, spec.response_column):
        if col not in dataset.column_names:
            raise DataError(f"task_accuracy needs a {col!r} column; the dataset has "
                            f"{dataset.column_names}.", "pass a builtin_task(...) dataset or rename "
                            "your columns to prompt/response")
    prompts = list(dataset[spec.prompt_column])
    answers = [str(a).strip() for a in dataset[spec.response_column]]
    if not prompts:
        raise DataError("task_accuracy got an empty dataset.", "pass at least one row")
    if max_new_tokens is None:
        max_new_tokens = max(len(tokenizer(a, add_special_tokens=False)["input_ids"])
                             for a in answers) + 1
    ids = [encode_prompt(tokenizer, p, spec) for p in prompts]
    return generate_greedy(model, tokenizer, ids, max_new_tokens, batch_size, spec=spec), answers
