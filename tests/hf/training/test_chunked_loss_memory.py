"""Measured memory of the chunked loss against the full one, each step in its own subprocess, and
against the planner's logits term (``lora_lab.core.memory.logits_bytes``).

A tiny Llama (hidden 64, 1 layer) with a 64k vocabulary, LoRA, fp32, 4 × 256 tokens: the logits
are everything.  Full loss: 1024 · 65,536 · 12 B = 805 MB of logits; chunked (128 tokens, a frozen
head: its fp32 logits turned into their gradient in place): 128 · 65,536 · 4 B = 34 MB.
Measured: the peak resident size of one forward + backward (VmHWM, reset just before) above the
resident size before it.
"""

from __future__ import annotations

from loss_rss_probe import measure

from lora_lab.core.memory import Architecture, logits_bytes

B, T, V, CHUNK = 4, 256, 65_536, 128


def _measure(chunked: bool) -> dict:
    return measure(B, T, V, [CHUNK if chunked else 0])[0]  # one step per subprocess


def test_measured_peak_drop_matches_the_planner():
    full, chunked = _measure(False), _measure(True)
    assert abs(full["loss"] - chunked["loss"]) <= 1e-5 * full["loss"]
    assert full["largest_logits"] == B * T * V and chunked["largest_logits"] == CHUNK * V
    arch = Architecture(hidden=64, intermediate=128, layers=1, heads=4, kv_heads=2, head_dim=16, vocab=V)
    predicted = logits_bytes(arch, B, T, 4) - logits_bytes(arch, B, T, 4, CHUNK, frozen_head=True)
    measured = full["extra"] - chunked["extra"]
    print(f"extra peak: full {full['extra'] / 2**20:.0f} MiB, chunked {chunked['extra'] / 2**20:.0f} "
          f"MiB; saved {measured / 2**20:.0f} MiB measured vs {predicted / 2**20:.0f} MiB planned")
    assert chunked["extra"] < 0.1 * full["extra"]   # measured 49 MiB against 784
    assert 0.75 * predicted <= measured <= 1.25 * predicted
