"""``estimate_memory(..., loss_chunk_size=C)``: the planner's logits term for a chosen chunk size,
against the measured peak of one chunked forward + backward at two chunk sizes (one subprocess, the
high-water mark reset before each step), and refusals of a size that is not a positive integer.

A tiny Llama (hidden 64, 1 layer) with a 64k vocabulary, LoRA, fp32, 4 × 256 tokens: the logits
are everything, so the step's extra peak moves with C·V·4 bytes (a frozen head's fp32 logits, turned
into their gradient in place: ``lora_lab.core.memory.logits_bytes``).
"""

from __future__ import annotations

import os

import pytest
from loss_rss_probe import measure
from transformers import LlamaConfig

import lora_lab as ll
from lora_lab.core.memory import DEFAULT_LOSS_CHUNK
from lora_lab.errors import LoraLabError

B, T, V = 4, 256, 65_536
SMALL, LARGE = 64, 512
CONFIG = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=T)

def _measure(*chunks: int) -> list[dict]:
    """One subprocess (imports are most of the time).  An unmeasured warm-up step first (the first
    step's one-off allocations), then the steps in the order given, the smaller chunk first, so
    that memory one step leaves mapped cannot hide the next one's."""
    # a fixed mmap threshold: glibc's dynamic one would keep freed chunks of a few MiB in the heap,
    # so the smaller chunk's logits would reuse pages already counted and read as ~0
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    return measure(B, T, V, [chunks[0], *chunks], env=env)[1:]


def _logits(chunk: int) -> float:
    est = ll.estimate_memory(CONFIG, ll.AdapterSpec(r=4), batch_size=B, seq_len=T, device="cpu",
                             precision="fp32", chunked_loss=True, loss_chunk_size=chunk)
    assert est.loss_chunk == chunk
    return est.scenarios[est.chosen]["logits"]


def test_planned_chunk_size_matches_the_measured_peak():
    # a frozen head in fp32: the chunk's fp32 logits, turned into their gradient in place (4 B each)
    assert _logits(SMALL) == SMALL * V * 4 and _logits(LARGE) == LARGE * V * 4
    small, large = _measure(SMALL, LARGE)
    assert small["loss"] == pytest.approx(large["loss"], rel=1e-5)
    predicted, measured = _logits(LARGE) - _logits(SMALL), large["extra"] - small["extra"]
    print(f"extra peak: chunk {SMALL} {small['extra'] / 2**20:.0f} MiB, chunk {LARGE} "
          f"{large['extra'] / 2**20:.0f} MiB; difference {measured / 2**20:.0f} MiB measured vs "
          f"{predicted / 2**20:.0f} MiB planned")
    # Measured 112 MiB against 112 planned.  (Before the softmax was built in place, logsumexp's
    # temporaries made it 8 B per logit, and the planner's 12 B read 0.67 of it.)
    assert 0.9 * predicted <= measured <= 1.1 * predicted


def test_default_and_bad_chunk_sizes():
    import inspect

    params = inspect.signature(ll.estimate_memory).parameters
    assert params["loss_chunk_size"].default == ll.TrainSpec().loss_chunk_size
    assert params["chunked_loss"].default == ll.TrainSpec().chunked_loss
    assert ll.estimate_memory(CONFIG, ll.AdapterSpec(r=4), device="cpu", chunked_loss=True,
                              seq_len=T, batch_size=B).loss_chunk == DEFAULT_LOSS_CHUNK
    assert ll.TrainSpec().loss_chunk_size == DEFAULT_LOSS_CHUNK
    # larger than all B·T tokens: one chunk.  The frozen head's fused chunk holds a third of what
    # the full loss holds in fp32 (4 B per logit against 12)
    def logits(chunked):
        est = ll.estimate_memory(CONFIG, ll.AdapterSpec(r=4), device="cpu", batch_size=B, seq_len=T,
                                 chunked_loss=chunked, loss_chunk_size=10**6)
        return est.scenarios[est.chosen]["logits"]

    assert logits(False) == B * T * V * 12 and logits(True) == logits(False) / 3
    for bad in (0, -5, 1.5, "512", True):
        with pytest.raises(LoraLabError, match="loss_chunk_size") as info:
            ll.estimate_memory(CONFIG, ll.AdapterSpec(r=4), chunked_loss=True, loss_chunk_size=bad)
        assert "Fix: pass loss_chunk_size=512" in str(info.value)
