"""The loss's term of the memory estimate (:mod:`lora_lab.core.memory`, which re-exports it): the
logits a step holds at its worst moment, with the full-vocabulary loss or the chunked one
(:mod:`lora_lab.hf.training.chunked_loss`, whose block size and chunk rule are these), and whether
the chunked loss runs.  The formulas are explained in :mod:`lora_lab.core.memory`'s docstring."""

from __future__ import annotations

__all__ = ["CHUNKED_LOSS_MIN_VOCAB", "DEFAULT_LOSS_CHUNK", "LOSS_BLOCK_BYTES", "logits_bytes",
           "loss_block_rows", "resolve_loss_chunk"]

CHUNKED_LOSS_MIN_VOCAB = 32_000         # chunked_loss="auto" from this vocabulary on
DEFAULT_LOSS_CHUNK = 512                # tokens per chunk of the chunked loss (TrainSpec's default)
LOSS_BLOCK_BYTES = 16 * 2**20
"""fp32 bytes of a frozen head's logits turned into their gradient at a time (the chunked loss): 85
rows of SmolLM2's 49,152 logits, 32 of Llama 3's 128,256; small enough to stay in a server CPU's
last-level cache through a block's passes."""


def resolve_loss_chunk(chunked, vocab: int, chunk_size: int = DEFAULT_LOSS_CHUNK) -> int | None:
    """Tokens per chunk of the loss that ``chunked`` (True, False or ``"auto"``) selects for a
    ``vocab``-sized head: ``chunk_size``, or None for the full-vocabulary loss.  ``"auto"``: on
    for ``vocab ≥`` :data:`CHUNKED_LOSS_MIN_VOCAB` (the rule of ``TrainSpec``)."""
    on = vocab >= CHUNKED_LOSS_MIN_VOCAB if chunked == "auto" else bool(chunked)
    return chunk_size if on else None


def logits_bytes(arch, batch: int, seq: int, c: int, chunk: int | None = None,
                 frozen_head: bool = False) -> float:
    """Worst moment of the loss (``arch``: a :class:`~lora_lab.core.memory.Architecture`, its ``vocab``
    read): ``T·V·max(c + 8, 12)``, or for the chunked loss ``min(chunk, T)·V``
    times that, or ``c`` plus one fp32 block with a frozen head (see :mod:`lora_lab.core.memory`)."""
    tokens = batch * seq if chunk is None else min(chunk, batch * seq)
    if chunk is None or not frozen_head:
        return tokens * arch.vocab * max(c + 8, 12)
    block = min(tokens, loss_block_rows(arch.vocab)) * arch.vocab * 4 if c < 4 else 0
    return tokens * arch.vocab * c + block


def loss_block_rows(vocab: int) -> int:
    """Rows of a frozen head's logits turned into their gradient at a time (chunked loss): one fp32
    block of :data:`LOSS_BLOCK_BYTES`, at least a row."""
    return max(1, LOSS_BLOCK_BYTES // (4 * vocab))
