"""Benchmark: peak memory of ``export_merged`` (streamed, shard by shard) vs a full merged copy.

Run:  nice python benchmarks/export_merged.py [--hidden 1024] [--layers 8] [--shard-mb 50] [--quant nf4]

A Llama built from a config (random weights, fp32 on CPU, LoRA r=16 on all linear layers with a
non-zero B) is exported twice in the same process, and the process RSS is sampled every 2 ms
(``/proc/self/statm``) during each:

* ``stream``: ``lora_lab.export_merged(model, dir, dtype=fp16, max_shard_size=shard, check=False)``;
* ``naive``: the usual recipe, ``copy.deepcopy(model).merge_and_unload().half().save_pretrained(dir,
  max_shard_size=shard)``, which holds a whole merged copy (the baseline).

Printed: the model's fp32 and fp16 sizes, the shard size, each method's peak RSS growth over its
start, and the ratios growth / shard and growth / model (fp16 output size).  Target from issue 11:
the streamed peak stays near one shard (a few shards at most, independent of the model size),
while the naive peak grows with the model.  ``--quant nf4`` loads the base in NF4 first (QLoRA);
the naive baseline is then ``lora_lab.merged_copy`` (a full-precision reload, since a packed 4-bit weight cannot be merged in place).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import os
import shutil
import tempfile
import threading
import time
import warnings

import torch

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """Context manager: the peak RSS growth (bytes) over the RSS at entry, sampled every 2 ms."""

    def __enter__(self):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed memory back first
        except OSError:
            pass
        self.start = self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())
        self.growth = self.peak - self.start


def build(hidden: int, layers: int, quant: str | None, folder: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    import lora_lab as ll

    cfg = LlamaConfig(vocab_size=8000, hidden_size=hidden, intermediate_size=int(hidden * 2.75),
                      num_hidden_layers=layers, num_attention_heads=hidden // 64,
                      num_key_value_heads=hidden // 128, max_position_embeddings=256)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    from transformers import AutoTokenizer

    from lora_lab.hf.model.builtin import TOKENIZER_DIR

    AutoTokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(folder)  # load_model wants one
    model = ll.load_model(folder, quant=quant, device="cpu")[0] if quant else \
        LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = ll.attach(model, ll.AdapterSpec(r=16, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
            # transformers may map weights lazily from the file: touch them all, as training would,
            # so that paging them in is not counted as the export's memory
            float(p.data.view(-1)[:: max(1, 4096 // p.element_size())].float().sum())
    return model


def main(argv=None) -> None:
    work = tempfile.mkdtemp(prefix="export_bench_")
    try:
        run(argv, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)   # several hundred MB of checkpoints


def run(argv, work: str) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--shard-mb", type=float, default=50)
    ap.add_argument("--quant", choices=["nf4", "fp4"], default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import lora_lab as ll
    from lora_lab.export.merged import export_merged

    model = build(args.hidden, args.layers, args.quant, os.path.join(work, "base"))
    shard = int(args.shard_mb * 10**6)
    warnings.simplefilter("ignore")
    t = time.perf_counter()
    with PeakRSS() as stream:
        result = export_merged(model, os.path.join(work, "stream"), dtype=torch.float16,
                                  max_shard_size=shard, check=False)
    t_stream = time.perf_counter() - t
    out_bytes = result.total_bytes
    t = time.perf_counter()
    with PeakRSS() as naive:
        if args.quant:
            merged, _ = ll.merged_copy(model)
        else:
            merged = copy.deepcopy(model).merge_and_unload()
        merged.half().save_pretrained(os.path.join(work, "naive"), max_shard_size=shard)
        del merged
    t_naive = time.perf_counter() - t
    mb = 2**20
    print(f"model: Llama hidden {args.hidden}, {args.layers} layers, base "
          f"{args.quant or 'fp32'}; {out_bytes / 2e6:.1f} M merged weights "
          f"(fp16 output {out_bytes / mb:.0f} MiB), LoRA r=16 all-linear")
    print(f"shard: {shard / mb:.1f} MiB -> {result.shards} shards; estimate printed by "
          f"export_merged: {result.peak_memory_bytes / mb:.0f} MiB")
    print("| method | peak RSS growth (MiB) | growth / shard | growth / fp16 model | time (s) |")
    print("|---|---|---|---|---|")
    for name, m, s in (("stream (export_merged)", stream, t_stream),
                       ("naive (full merged copy)", naive, t_naive)):
        print(f"| {name} | {m.growth / mb:.0f} | {m.growth / shard:.2f} | "
              f"{m.growth / out_bytes:.2f} | {s:.1f} |")
    print(f"naive / stream peak growth: {naive.growth / max(stream.growth, 1):.1f}x")


if __name__ == "__main__":
    main()
