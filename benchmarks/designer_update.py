"""Benchmark: one AdapterDesigner update (recount + re-estimate + redraw) on a 32-layer config.

Run:  nice python benchmarks/designer_update.py

Target (issue 7): one update < 50 ms on a 32-layer model.  Baseline measured in the same run: the
cold path, ``estimate_memory`` on a config seen for the first time (meta-device instantiation of the
model, then the estimate), which a widget pays once at construction.
"""

from __future__ import annotations

import statistics
import time

from transformers import LlamaConfig

from lora_lab.hf.model import facts, plan
from lora_lab.ui.designer import AdapterDesigner

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    cfg = LlamaConfig(**LLAMA3_8B)
    facts._CACHE.clear()
    cold = timed(lambda: plan.estimate_memory(cfg, quant="nf4"))
    d = AdapterDesigner(cfg)
    changes = [
        ("rank", lambda i: setattr(d.r, "value", 8 + 8 * (i % 8))),
        ("seq len", lambda i: setattr(d.seq_len, "value", 128 * (i + 5))),
        ("batch", lambda i: setattr(d.batch, "value", 1 + i % 8)),
        ("preset", lambda i: d.apply_preset(("attention q+v", "all attention", "all linear")[i % 3])),
        ("one target", lambda i: setattr(d.targets["k_proj"], "value", not d.targets["k_proj"].value)),
        ("layers", lambda i: setattr(d.layers, "value", tuple(range(1 + i % 32)))),
        ("method", lambda i: setattr(d.method, "value", ("LoRA", "DoRA", "rsLoRA", "IA3")[i % 4])),
        ("device", lambda i: setattr(d.device, "value", ("T4", "L4", "A100-80GB")[i % 3])),
    ]
    d.all_layers.value = False
    print(f"cold estimate (meta instantiation of a 32-layer 8B config): {cold * 1e3:8.1f} ms")
    worst = 0.0
    for name, change in changes:
        times = []
        for i in range(1, 13):
            before = d.updates
            times.append(timed(lambda: change(i)))
            assert d.updates > before and d.error == "", (name, d.error)
        med = statistics.median(times)
        worst = max(worst, med)
        print(f"update: {name:<11} median {med * 1e3:6.1f} ms  max {max(times) * 1e3:6.1f} ms  "
              f"(cold/update = {cold / med:5.0f}x)")
    print(f"worst median update {worst * 1e3:.1f} ms; target < 50 ms: "
          f"{'MET' if worst < 0.05 else 'NOT MET'}")


if __name__ == "__main__":
    main()
