"""Packing: several whole examples in one row, each attending only to itself.

Short examples waste most of a padded batch.  *Packing* places whole examples one after another in a
row of at most ``max_length`` tokens (greedy, in order; an example is never split).  Concatenation
alone is wrong: under the causal mask a later example attends to every token of the earlier ones, and
its positions continue where they stopped (the 3rd example of a pack starts at position 60, not 0).
Measured on ``builtin:tiny`` with the 128 examples of ``builtin_task("copy")``, the token-mean loss is
0.0033 unpacked and 11.92 concatenated, because that model never saw positions past ~40 nor an answer
preceded by an unrelated one.

Packing here keeps every example to itself.  Each packed row carries ``position_ids`` that restart at
0 for every example::

    input_ids    = [ a0 a1 a2 a3 | b0 b1 b2 | c0 c1 ]
    position_ids = [ 0  1  2  3  | 0  1  2  | 0  1  ]

and no ``attention_mask``.  transformers 5 (``masking_utils.find_packed_sequence_indices``) reads
any step of the position other than +1 from one token to the next as the start of a new sequence,
and builds the block-diagonal causal mask from it: token ``i`` attends to token ``j`` only when both
lie in the same example and ``j ≤ i``.  RoPE sees each example at the positions it has alone::

    mask[i, j] = (seq(i) == seq(j)) and (j <= i)        seq(i) = example that token i belongs to

Flash attention
takes the same ``position_ids`` as variable-length sequences (no mask at all); sdpa, eager and flex
attention get the explicit mask.  This is transformers' own ``DataCollatorWithFlattening`` format
("padding-free" training in TRL), kept in rows of ``max_length`` so a batch has ``B`` rows.  The
result: every token's loss equals its loss with the example alone, to float rounding (measured on
``builtin:tiny``, 128 examples packed into 7 rows of ≤ 512 tokens: at most 2e-5 on losses up to ~20).

Two conditions, both met by :func:`lora_lab.train` and by ``transformers.Trainer``
(``TrainingArguments.use_cache=False``):

* the model is called **without** ``attention_mask`` (transformers looks for packed sequences only
  when it is absent) and
* **without a KV cache** (``use_cache=False``; a training forward has nothing to cache, but
  ``model(**batch)`` alone builds one from ``config.use_cache`` and then ignores the packing).

Prompt and prefix tuning cannot be packed: peft drops (prompt tuning) or shifts and caches (prefix
tuning) the ``position_ids``.

Padding a packed batch (:func:`pad_packed`): the shorter rows are filled with the pad id, labels -100
and position 0 for every padding token, so each one is a sequence of its own (it attends only to
itself, which keeps softmax rows finite, and no real token attends to it).
"""

from __future__ import annotations

import torch

from ...errors import DataError

__all__ = ["pack_examples", "pad_packed", "is_packed", "count_tokens", "IGNORE_INDEX"]

IGNORE_INDEX = -100


def pack_examples(examples: list[dict], max_length: int) -> list[dict]:
    """Greedy in-order packing of whole examples into rows of ≤ ``max_length`` tokens.

    Each row has ``input_ids``, ``labels`` and ``position_ids`` (restarting at 0 for each example).
    The model's loss shifts labels by one (logit t is scored against label t+1), so the last token of
    example A would be scored against the first label of the example B that follows it, a target
    that does not exist when B is alone (its first label is shifted out).  The first label of every
    example is therefore set to -100; with ``train_on_responses_only`` it is a prompt token and is
    -100 already.
    """
    packs: list[dict] = []
    for ex in examples:
        ids, labels = list(ex["input_ids"]), list(ex["labels"])
        if not packs or len(packs[-1]["input_ids"]) + len(ids) > max_length:
            packs.append({"input_ids": [], "labels": [], "position_ids": []})
        pack = packs[-1]
        pack["input_ids"] += ids
        pack["labels"] += [IGNORE_INDEX] + labels[1:]  # never a target alone either (see above)
        pack["position_ids"] += list(range(len(ids)))
    return packs


def is_packed(rows: list[dict]) -> bool:
    """True when any row carries ``position_ids`` (a packed row from :func:`pack_examples`)."""
    return any("position_ids" in r for r in rows)


def _no_padding_inside(row: dict, i: int) -> None:
    mask = row.get("attention_mask")
    if mask is not None and not bool(torch.as_tensor(mask).bool().all()):
        raise DataError(f"Row {i} has position_ids (a packed row) and an attention_mask with zeros.",
                        "pack rows without padding inside them: the position_ids alone mark where "
                        "each example starts")


def pad_packed(rows: list[dict], pad_token_id: int, length: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad packed rows into ``input_ids``, ``labels`` and ``position_ids`` of shape (B, T),
    T = ``length`` or the longest row.

    No ``attention_mask`` is returned (see the module docstring).  A row without ``position_ids``
    counts as one example (0 … n-1); padding gets position 0, labels -100 and ``pad_token_id``.
    """
    B, T = len(rows), max([len(r["input_ids"]) for r in rows] + [length or 0])
    out = {"input_ids": torch.full((B, T), int(pad_token_id), dtype=torch.long),
           "labels": torch.full((B, T), IGNORE_INDEX, dtype=torch.long),
           "position_ids": torch.zeros((B, T), dtype=torch.long)}
    for i, row in enumerate(rows):
        _no_padding_inside(row, i)
        x = torch.as_tensor(row["input_ids"], dtype=torch.long).flatten()
        n = len(x)
        out["input_ids"][i, :n] = x
        out["labels"][i, :n] = torch.as_tensor(row.get("labels", x)).flatten()
        pos = row.get("position_ids")
        out["position_ids"][i, :n] = (torch.arange(n) if pos is None
                                      else torch.as_tensor(pos, dtype=torch.long).flatten())
    return out


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """The tokens of a batch from ``pad_batch`` that are not padding.

    ``attention_mask.sum()`` for an ordinary batch.  A packed batch has no mask: its padding is the
    run of position-0 tokens at the end of each row (every example has at least two tokens, a prompt
    token and the end of the response, so a real example never ends a row at position 0).
    """
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    pos = batch["position_ids"]
    nonzero = (pos != 0).long()
    T = pos.shape[-1]
    last = T - 1 - nonzero.flip(-1).argmax(-1)  # the last position != 0 in each row
    return int(torch.where(nonzero.any(-1), last + 1, torch.zeros_like(last)).sum())
