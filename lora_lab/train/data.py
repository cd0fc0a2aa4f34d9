"""Training data as deterministic batches.

``train()`` accepts three kinds of data:

* a :class:`~lora_lab.PreparedData` (from :func:`lora_lab.prepare_dataset`): its ``train`` split, and
  its ``eval`` split when no ``eval_data`` is given;
* already tokenized rows (a ``datasets.Dataset`` or list of dicts with ``input_ids``, optional
  ``attention_mask`` and ``labels``, or ``position_ids`` for packed rows), used as they are;
* raw rows (prompt/response or chat messages), tokenized with the default ``DataSpec``.

Batch ``i`` (0-based, counting micro-batches) is a pure function of ``(seed, i)``: epoch
``e = i // batches_per_epoch`` uses the permutation drawn from ``seed + e``.  A resumed run therefore
sees exactly the batches the uninterrupted run would have seen.

A batch is :func:`lora_lab.hf.data.prepare.pad_batch` of its rows.  Packed rows (``DataSpec(packing=
True)``) give ``position_ids`` and no ``attention_mask``; the model must then run with
``use_cache=False`` (see :mod:`lora_lab.hf.data.packing`), and :func:`batch_tokens` counts the
tokens of either kind of batch.
"""

from __future__ import annotations

import math

import torch

from ..errors import DataError
from ..specs import DataSpec

__all__ = ["resolve_data", "Batches", "batch_tokens"]


def _rows(data) -> list[dict]:
    """Rows as a list of dicts, from a list of dicts or a ``datasets.Dataset``."""
    if hasattr(data, "to_list"):
        return data.to_list()
    return [dict(r) for r in data]


def _is_tokenized(data) -> bool:
    cols = getattr(data, "column_names", None)
    if cols is not None:
        return "input_ids" in cols
    try:
        first = data[0]
    except (IndexError, KeyError, TypeError):
        return False
    return isinstance(first, dict) and "input_ids" in first


def _prepare(data, tokenizer, eval_fraction: float):
    from ..hf.data.prepare import prepare_dataset

    return prepare_dataset(data, tokenizer, DataSpec(eval_fraction=eval_fraction))


def resolve_data(train_data, eval_data, tokenizer, model=None) -> tuple[list[dict], list[dict] | None]:
    """Tokenized ``(train_rows, eval_rows or None)`` from whatever ``train()`` was given.

    Packed rows (``DataSpec(packing=True)``: ``position_ids`` that restart per example) are refused
    for prompt and prefix tuning, whose peft models drop or shift ``position_ids``, so the examples
    of a packed row would attend to each other."""
    own_eval = None
    if hasattr(train_data, "train") and hasattr(train_data, "eval"):  # PreparedData
        train, own_eval = train_data.train, train_data.eval
    elif _is_tokenized(train_data):
        train = train_data
    else:
        prepared = _prepare(train_data, tokenizer, 0.0 if eval_data is not None else 0.1)
        train, own_eval = prepared.train, prepared.eval
    if eval_data is None:
        ev = own_eval
    elif hasattr(eval_data, "train") and hasattr(eval_data, "eval"):
        ev = eval_data.eval if eval_data.eval is not None else eval_data.train
    elif _is_tokenized(eval_data):
        ev = eval_data
    else:
        ev = _prepare(eval_data, tokenizer, 0.0).train
    rows = _rows(train)
    if not rows:
        raise DataError("train_data has no rows.", "pass at least one training example")
    config = getattr(model, "active_peft_config", None)
    if getattr(config, "is_prompt_learning", False) and "position_ids" in rows[0]:
        raise DataError(f"Packed rows cannot train {config.peft_type.value.lower()}: peft drops or shifts "
                        "their position ids, so packed examples would attend to each other.",
                        "prepare the data with lora_lab.DataSpec(packing=False)")
    return rows, (_rows(ev) if ev is not None and len(ev) else None)


def _pad(rows: list[dict], pad_id: int, multiple_of: int | None = None,
         max_length: int | None = None) -> dict[str, torch.Tensor]:
    from ..hf.data.prepare import pad_batch

    return pad_batch(rows, pad_id, multiple_of=multiple_of, max_length=max_length)


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    """The non-padding tokens of a batch: ``attention_mask.sum()``, or for a packed batch (no mask)
    the tokens before each row's padding (:func:`lora_lab.hf.data.packing.count_tokens`)."""
    from ..hf.data.packing import count_tokens

    return count_tokens(batch)


class Batches:
    """Micro-batch ``i`` of ``rows``, shuffled per epoch from ``seed`` (see the module docstring)."""

    def __init__(self, rows: list[dict], batch_size: int, seed: int, pad_id: int,
                 multiple_of: int | None = None, max_length: int | None = None):
        self.rows, self.batch_size, self.seed, self.pad_id = rows, batch_size, seed, pad_id
        self.multiple_of, self.max_length = multiple_of, max_length
        self.per_epoch = math.ceil(len(rows) / batch_size)
        self._epoch, self._order = None, None

    def steps_for(self, epochs: float, grad_accum: int) -> int:
        """Optimizer steps in ``epochs`` passes."""
        return max(1, math.ceil(epochs * self.per_epoch / grad_accum))

    def _perm(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._order = torch.randperm(len(self.rows), generator=g).tolist()
            self._epoch = epoch
        return self._order

    def __call__(self, i: int) -> dict[str, torch.Tensor]:
        epoch, j = divmod(i, self.per_epoch)
        order = self._perm(epoch)
        idx = order[j * self.batch_size:(j + 1) * self.batch_size]
        return _pad([self.rows[k] for k in idx], self.pad_id, self.multiple_of, self.max_length)

    def epoch_of(self, i: int) -> float:
        return i / self.per_epoch


def eval_batches(rows: list[dict], batch_size: int, pad_id: int, multiple_of: int | None = None,
                 max_length: int | None = None):
    for s in range(0, len(rows), batch_size):
        yield _pad(rows[s:s + batch_size], pad_id, multiple_of, max_length)
