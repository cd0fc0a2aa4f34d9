"""The loss of one optimizer step under gradient accumulation: a mean over tokens, not micro-batches.

A causal LM's loss averages the cross-entropy ℓ_t over the *supervised* tokens: the labels that are
not -100 after the shift by one (position t predicts token t+1, so the first label of a row is never
predicted).  With responses-only labels (prompt masked) micro-batches hold very different numbers of
them.  One optimizer step over K micro-batches S_1 … S_K, with n_k supervised tokens in S_k, has the
objective of the one batch S_1 ∪ … ∪ S_K::

    loss_step = Σ_k Σ_{t ∈ S_k} ℓ_t / N,        N = Σ_k n_k     (supervised tokens in the step)

The model returns micro-batch k's mean, mean_k = Σ_{t ∈ S_k} ℓ_t / n_k, so micro-batch k adds
``mean_k · n_k / N`` to the loss, and its backward adds (n_k / N) ∇mean_k to the gradient: after K
backwards the gradient is exactly that of the full batch.  Dividing each mean_k by K instead gives
Σ_k mean_k / K, which weights a 1-token answer as much as a 40-token one; on rows of unequal response
lengths its gradient differs from the full batch's by more than the gradient's own norm (measured in
``tests/train/test_grad_accum.py``).  ``transformers.Trainer`` had the same bug until 2024, and fixed
it by passing ``num_items_in_batch`` = N to the model, which then returns Σ ℓ / N: the same
objective.  Here N is counted from the labels, so it works for any model that returns a token mean.

The reported loss is ``loss_step`` itself, the token mean over the step.

Prompt tuning prepends virtual tokens to the sequence (label -100); the last of them predicts the
row's first label, so there every label ≠ -100 counts.  The loop sees this from the logits, which
are then longer than the labels.  A micro-batch with no supervised token adds nothing (its mean would
be 0/0 = NaN) and is skipped; a step with none at all has no loss (``None``) and no update.

With ``chunk_size`` set (``TrainSpec.chunked_loss``) the loss of a micro-batch comes from
:func:`lora_lab.hf.training.chunked_loss.chunked_causal_lm_loss` as the sum Σ_{t ∈ S_k} ℓ_t, never
holding its full ``(B, T, V)`` logits, and micro-batch k adds ``Σ ℓ / N`` directly: the same
objective and gradient.  (Prompt learning, which needs the virtual-prefix rule, is refused there.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..hf.training.chunked_loss import chunked_causal_lm_loss
from .data import batch_tokens

__all__ = ["NonFinite", "Accumulated", "supervised_tokens", "has_virtual_prefix", "accumulate", "loss_sum",
           "loss_kind", "precision_label"]

IGNORE_INDEX = -100


class NonFinite(Exception):
    """A NaN/inf loss or grad norm at (1-based) step ``step``: the loop saves and stops."""

    def __init__(self, step: int, what: str, value: float):
        self.step, self.what, self.value = step, what, value
        super().__init__(f"{what} = {value} at step {step}")


@dataclass(frozen=True)
class Accumulated:
    """What the micro-batches of one step gave.

    ``loss``: Σ ℓ / N over the step (None when N = 0); ``tokens``: non-padding tokens, prompts
    included (``attention_mask.sum()``); ``supervised``: N, the tokens the loss averages over.
    """

    loss: float | None
    tokens: int
    supervised: int


def supervised_tokens(labels: torch.Tensor, virtual_prefix: bool = False) -> int:
    """How many labels (shape (B, T)) a causal-LM loss averages over.

    ``labels[:, 1:] != -100``: the shift drops the first column.  With ``virtual_prefix`` (prompt
    tuning: virtual tokens before the row) the first label is predicted too, so all columns count.
    """
    kept = labels if virtual_prefix else labels[:, 1:]
    return int((kept != IGNORE_INDEX).sum())


def has_virtual_prefix(output, labels: torch.Tensor) -> bool:
    """Whether the model put tokens before the row: its logits are longer than the labels."""
    logits = getattr(output, "logits", None)
    return logits is not None and logits.shape[1] > labels.shape[1]


def accumulate(model, batches: list[dict[str, torch.Tensor]], *, forward_kwargs: dict, precision,
               scaler, step: int, chunk_size: int | None = None) -> Accumulated:
    """Forward and backward every micro-batch of optimizer step ``step`` (1-based, for messages),
    weighting micro-batch k by n_k / N (see the module docstring).

    ``batches``: the K micro-batches (``input_ids``, ``labels`` and ``attention_mask``, or
    ``position_ids`` for packed rows; shape (B, T)),
    on the model's device.  ``precision`` gives the autocast context, ``scaler`` a ``GradScaler``
    or None.  Gradients accumulate in ``.grad``; raises :class:`NonFinite` on a NaN/inf loss.
    ``chunk_size``: tokens per chunk of the chunked loss, or None for the model's own loss.
    """
    if chunk_size is not None:
        return _accumulate_chunked(model, batches, forward_kwargs, precision, scaler, step, chunk_size)
    tokens = sum(batch_tokens(b) for b in batches)
    total, n_step, virtual = 0.0, None, False
    for batch in batches:
        if n_step is not None and supervised_tokens(batch["labels"], virtual) == 0:
            continue  # nothing supervised here: no forward needed
        with precision.autocast():
            output = model(**batch, **forward_kwargs)
        mean = output.loss  # Σ_{t ∈ S_k} ℓ_t / n_k, computed by the model
        if n_step is None:  # the first forward tells whether the model prepends virtual tokens
            virtual = has_virtual_prefix(output, batch["labels"])
            n_step = sum(supervised_tokens(b["labels"], virtual) for b in batches)
        del output  # free the (B, T, vocab) logits before the next forward
        n = supervised_tokens(batch["labels"], virtual)
        if n == 0:
            continue
        value = float(mean.detach())
        if not math.isfinite(value):
            raise NonFinite(step, "loss", value)
        loss = mean * (n / n_step)  # this micro-batch's share of Σ ℓ / N
        (scaler.scale(loss) if scaler is not None else loss).backward()
        total += value * n / n_step
    n_step = n_step or 0
    return Accumulated(loss=total if n_step else None, tokens=tokens, supervised=n_step)


def _accumulate_chunked(model, batches, forward_kwargs, precision, scaler, step: int,
                        chunk_size: int) -> Accumulated:
    """:func:`accumulate` with the chunked loss: micro-batch k backpropagates Σ_{t ∈ S_k} ℓ_t / N."""
    tokens = sum(batch_tokens(b) for b in batches)
    n_step = sum(supervised_tokens(b["labels"]) for b in batches)
    total = 0.0
    for batch in batches:
        if supervised_tokens(batch["labels"]) == 0:
            continue
        with precision.autocast():
            summed, _ = chunked_causal_lm_loss(model, batch, chunk_size=chunk_size, **forward_kwargs)
        loss = summed / n_step  # this micro-batch's share of Σ ℓ / N
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFinite(step, "loss", value * n_step / supervised_tokens(batch["labels"]))
        (scaler.scale(loss) if scaler is not None else loss).backward()
        total += value
    return Accumulated(loss=total if n_step else None, tokens=tokens, supervised=n_step)


def loss_sum(model, batch: dict[str, torch.Tensor], forward_kwargs: dict,
             chunk_size: int | None = None) -> tuple[float, int]:
    """``(Σ ℓ, n)`` of one batch for evaluation (call under ``no_grad`` and autocast): the model's
    mean times n, or the chunked sum when ``chunk_size`` is set.  n = 0: ``(0.0, 0)``."""
    if chunk_size is not None:
        summed, n = chunked_causal_lm_loss(model, batch, chunk_size=chunk_size, **forward_kwargs)
        return float(summed), n
    out = model(**batch, **forward_kwargs)
    n = supervised_tokens(batch["labels"], has_virtual_prefix(out, batch["labels"]))
    return (float(out.loss) * n if n else 0.0), n  # a batch with nothing supervised has loss 0/0


def loss_kind(chunk_size: int | None) -> str:
    """What the dashboard and ``TrainResult.final`` call the loss that ran."""
    return "full" if chunk_size is None else f"chunked ({chunk_size} tokens)"


def precision_label(precision) -> str:
    """What the matrix products of a run compute in, for ``TrainState.precision`` and
    ``TrainResult.final``: ``"fp32"``, ``"bf16 autocast"`` or ``"fp16 autocast"`` (the adapter's
    weights, gradients and optimizer state are fp32 in every case)."""
    return precision.name if precision.dtype is None else f"{precision.name} autocast"


class TrainMode:
    """Keeps every module of ``model`` in training mode at the start of each step, cheaply.

    ``model.train()`` walks the module tree in Python (about 1 ms for the 341 modules of
    ``builtin:tiny`` with LoRA: 8% of a small step), and the top module's ``training`` flag alone
    is not enough: a model from ``from_pretrained`` is in eval mode under a fresh ``PeftModel``
    whose own flag says training, and a callback may put any submodule in eval mode.  So the flags
    of all modules, listed once, are read each step (16 µs) and ``train()`` runs only when one is
    off."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.modules = model, list(model.modules())

    def ensure(self) -> None:
        if not all(m.training for m in self.modules):
            self.model.train()
