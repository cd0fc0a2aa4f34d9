"""Measured memory of the chunked loss against the full one, each step in its own subprocess, and
against the planner's logits term (``lora_lab.core.memory.logits_bytes``).

A tiny Llama (hidden 64, 1 layer) with a 64k vocabulary, LoRA, fp32, 4 × 256 tokens: the logits
are everything.  Full loss: 1024 · 65,536 · 12 B = 805 MB of logits; chunked (128 tokens, a frozen
head: its fp32 logits turned into their gradient in place): 128 · 65,536 · 4 B = 34 MB.
Measured: the peak resident size of one forward + backward (VmHWM, reset just before) above the
resident size before it.
"""

from __future__ import annotations

import pytest
import torch
from lora_testing import allocated_peak
from loss_rss_probe import measure

from lora_lab.core.memory import Architecture, logits_bytes

B, T, V, CHUNK = 4, 256, 65_536, 128


def _measure(chunked: bool) -> dict:
    return measure(B, T, V, [CHUNK if chunked else 0])[0]  # one step per subprocess


ARCH = Architecture(hidden=64, intermediate=128, layers=1, heads=4, kv_heads=2, head_dim=16, vocab=V)


def test_measured_peak_drop_matches_the_planner():
    full, chunked = _measure(False), _measure(True)
    assert abs(full["loss"] - chunked["loss"]) <= 1e-5 * full["loss"]
    assert full["largest_logits"] == B * T * V and chunked["largest_logits"] == CHUNK * V
    predicted = logits_bytes(ARCH, B, T, 4) - logits_bytes(ARCH, B, T, 4, CHUNK, frozen_head=True)
    measured = full["extra"] - chunked["extra"]
    print(f"extra peak: full {full['extra'] / 2**20:.0f} MiB, chunked {chunked['extra'] / 2**20:.0f} "
          f"MiB; saved {measured / 2**20:.0f} MiB measured vs {predicted / 2**20:.0f} MiB planned")
    assert chunked["extra"] < 0.1 * full["extra"]   # measured 49 MiB against 784
    assert 0.75 * predicted <= measured <= 1.25 * predicted


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_allocated_peak_of_a_frozen_head_chunk_is_the_planners(one_thread, precision):
    """Torch's own allocation events (the profiler's, in time order) over one chunked loss forward
    + backward, past what existed before it: the planner's logits term within 10%.  A frozen
    head's chunk holds its logits once, turned into their gradient in place one 16 MiB fp32 block
    at a time: under bf16 autocast 128 · 65,536 · 2 B + 16 MiB = 32 MiB, where an fp32 copy and a
    bf16 gradient beside the logits (2c + 4 bytes each) would be 64 MiB; in fp32 the block is
    the logits themselves: 32 MiB."""
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_lab.hf.training.chunked_loss import chunked_causal_lm_loss

    cfg = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=T)
    torch.manual_seed(0)
    model = peft.get_peft_model(LlamaForCausalLM(cfg), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    ids = torch.randint(0, V, (B, T))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            total, n = chunked_causal_lm_loss(model, {"input_ids": ids, "labels": ids},
                                              chunk_size=CHUNK, use_cache=False)
        (total / n).backward()
        model.zero_grad(set_to_none=True)

    peak = allocated_peak(step)
    c = 2 if precision == "bf16" else 4
    planned = logits_bytes(ARCH, B, T, c, CHUNK, frozen_head=True)
    assert planned == (CHUNK * V * 2 + 16 * 2**20 if precision == "bf16" else CHUNK * V * 4)
    acts = B * T * 64 * 4 * 12          # the decoder's activations and the kept ∂ℓ/∂h: a few MiB
    if precision == "bf16":
        acts += V * 64 * 2              # autocast's bf16 copy of the fp32 head (stored in bf16: none)
    print(f"{precision}: allocated peak {peak / 2**20:.1f} MiB, planned logits {planned / 2**20:.1f} MiB")
    assert planned <= peak <= 1.10 * planned + acts
