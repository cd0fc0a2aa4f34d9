"""Measured memory of the chunked loss against the full one, each step in its own subprocess, and
against the planner's logits term (``lora_lab.core.memory.logits_bytes``).

A tiny Llama (hidden 64, 1 layer) with a 64k vocabulary, LoRA, fp32, 4 × 256 tokens: the logits
are everything.  Full loss: 1024 · 65,536 · 12 B = 805 MB of logits; chunked (128 tokens): 101 MB.
Measured: the peak resident size of one forward + backward (VmHWM, reset just before) above the
resident size before it.
"""

from __future__ import annotations

import json
import subprocess
import sys

from lora_lab.core.memory import Architecture, logits_bytes

B, T, V, CHUNK = 4, 256, 65_536, 128

SCRIPT = r"""
import json, sys, torch
torch.set_num_threads(1)
from transformers import LlamaConfig, LlamaForCausalLM
import peft
from lora_lab.hf.training.chunked_loss import chunked_causal_lm_loss
B, T, V, CHUNK, chunked = *map(int, sys.argv[1:5]), sys.argv[5] == "1"
cfg = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=T)
torch.manual_seed(0)
model = peft.get_peft_model(LlamaForCausalLM(cfg), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
ids = torch.randint(0, V, (B, T))
batch = {"input_ids": ids, "labels": ids}
shapes = []
model.get_base_model().lm_head.register_forward_hook(lambda m, i, o: shapes.append(o.numel()))
from lora_lab.train.measure import peak_rss_mb, reset_peak_rss, rss_mb
def rss():
    return round(rss_mb() * 2**20)
def high_water():  # VmHWM: this process's own peak since the last reset_peak_rss()
    return round(peak_rss_mb() * 2**20)
# getrusage's ru_maxrss would not do: Linux carries the parent's peak across exec, so a child of a
# 2 GB pytest process reports 2 GB.  Writing 5 to clear_refs resets VmHWM to the current RSS.
reset_peak_rss()
before = rss()
if chunked:
    total, n = chunked_causal_lm_loss(model, batch, chunk_size=CHUNK, use_cache=False)
    loss = total / n
else:
    loss = model(**batch, use_cache=False).loss
loss.backward()
peak = high_water()
print(json.dumps({"extra": peak - before, "loss": float(loss), "largest_logits": max(shapes)}))
"""


def _measure(chunked: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(B), str(T), str(V), str(CHUNK),
                          "1" if chunked else "0"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_measured_peak_drop_matches_the_planner():
    full, chunked = _measure(False), _measure(True)
    assert abs(full["loss"] - chunked["loss"]) <= 1e-5 * full["loss"]
    assert full["largest_logits"] == B * T * V and chunked["largest_logits"] == CHUNK * V
    arch = Architecture(hidden=64, intermediate=128, layers=1, heads=4, kv_heads=2, head_dim=16, vocab=V)
    predicted = logits_bytes(arch, B, T, 4) - logits_bytes(arch, B, T, 4, CHUNK)
    measured = full["extra"] - chunked["extra"]
    print(f"extra peak: full {full['extra'] / 2**20:.0f} MiB, chunked {chunked['extra'] / 2**20:.0f} "
          f"MiB; saved {measured / 2**20:.0f} MiB measured vs {predicted / 2**20:.0f} MiB planned")
    assert chunked["extra"] < 0.35 * full["extra"]
    assert 0.75 * predicted <= measured <= 1.25 * predicted
