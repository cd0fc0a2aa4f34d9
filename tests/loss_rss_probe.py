"""The extra peak memory of one LoRA loss step on a tiny Llama with a large vocabulary, measured in
a fresh interpreter (shared by tests/core/test_memory_chunk_size.py and
tests/hf/training/test_chunked_loss_memory.py).

The model: hidden 64, one layer, LoRA r=4 on q and v, fp32, one thread, so the logits are nearly
everything a step allocates.  For each mode given, in order: a chunk size C (the chunked loss,
:func:`lora_lab.hf.training.chunked_loss.chunked_causal_lm_loss`) or 0 (the model's own full
loss), one forward + backward from a freshly reset high-water mark (VmHWM; getrusage's ru_maxrss
would not do: Linux carries the parent's peak across exec, so a child of a 2 GB pytest process
reports 2 GB).  Per mode: ``extra`` (peak − resident size before, bytes), ``loss`` and
``largest_logits`` (the most logits the head produced at once).
"""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = r"""
import json, sys, torch
torch.set_num_threads(1)
from transformers import LlamaConfig, LlamaForCausalLM
import peft
from lora_lab.hf.training.chunked_loss import chunked_causal_lm_loss
from lora_lab.train.measure import peak_rss_mb, reset_peak_rss, rss_mb
B, T, V = map(int, sys.argv[1:4])
cfg = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=T)
torch.manual_seed(0)
model = peft.get_peft_model(LlamaForCausalLM(cfg), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
ids = torch.randint(0, V, (B, T))
batch = {"input_ids": ids, "labels": ids}
shapes = []
model.get_base_model().lm_head.register_forward_hook(lambda m, i, o: shapes.append(o.numel()))
out = {}
for i, mode in enumerate(sys.argv[4:]):
    chunk = int(mode)
    model.zero_grad(set_to_none=True)
    shapes.clear()
    reset_peak_rss()
    before = rss_mb()
    if chunk:
        total, n = chunked_causal_lm_loss(model, batch, chunk_size=chunk, use_cache=False)
        loss = total / n
    else:
        loss = model(**batch, use_cache=False).loss
    loss.backward()
    out[f"{i}:{mode}"] = {"extra": round((peak_rss_mb() - before) * 2**20), "loss": float(loss),
                          "largest_logits": max(shapes)}
    del loss
print(json.dumps(out))
"""


def measure(batch: int, seq: int, vocab: int, modes: list[int], env: dict | None = None) -> list[dict]:
    """One subprocess running ``modes`` in order (see the module docstring); one dict per mode."""
    cmd = [sys.executable, "-c", SCRIPT, str(batch), str(seq), str(vocab), *map(str, modes)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return list(json.loads(out.stdout.strip().splitlines()[-1]).values())
