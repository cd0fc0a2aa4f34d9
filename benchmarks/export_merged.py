"""Benchmark: peak memory of ``export_merged`` (streamed, shard by shard) vs a full merged copy.

Run:  nice python benchmarks/export_merged.py [--hidden 1024] [--layers 8] [--shard-mb 50] [--quant nf4]
      python benchmarks/export_merged.py --quick      # hidden 512, 4 layers, 10 MB shards

A Llama built from a config (random weights, fp32 on CPU, LoRA r=16 on all linear layers with a
non-zero B) is exported three times in the same process, and the process RSS is sampled every 2 ms
(``/proc/self/statm``) during each:

* ``stream``: ``lora_lab.export_merged(model, dir, dtype=fp16, max_shard_size=shard, check=False)``;
  the model stays usable (adapter unmerged, fp32);
* ``copy`` (keep-the-model recipe): ``copy.deepcopy(model).merge_and_unload().half()
  .save_pretrained(dir, max_shard_size=shard)``: what a user does who wants to go on working with
  the adapter afterwards; it holds a whole fp32 merged copy;
* ``in place`` (peft's documented recipe, the baseline): ``model.merge_and_unload().half()
  .save_pretrained(dir, max_shard_size=shard)``, run last because it consumes the model (merged
  into the base weights, converted to fp16 parameter by parameter, the fp32 originals freed).

Printed: the model's fp32 and fp16 sizes, the shard size, each method's peak RSS growth over its
start, and the ratios growth / shard and growth / model (fp16 output size).  Target from issue 11:
the streamed peak stays near one shard (a few shards at most, independent of the model size),
while a merged copy's peak grows with the model.  The headline ratio is against ``in place``;
``copy`` is the other baseline.  ``--quant nf4`` loads the base in NF4 first (QLoRA); both baselines
are then ``lora_lab.merged_copy`` (a full-precision reload: a packed 4-bit weight cannot be merged
in place), so only one is run.  The last line of the output is the JSON line of
``benchmarks/_report.py``.
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

import _report
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
    ap.add_argument("--quick", action="store_true", help="hidden 512, 4 layers, 10 MB shards")
    args = ap.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.shard_mb = 512, 4, 10
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
    runs = [("stream (export_merged)", stream, t_stream)]
    t = time.perf_counter()
    with PeakRSS() as copied:
        if args.quant:
            merged, _ = ll.merged_copy(model)
        else:
            merged = copy.deepcopy(model).merge_and_unload()
        merged.half().save_pretrained(os.path.join(work, "copy"), max_shard_size=shard)
        del merged
    runs.append(("merged_copy (full-precision reload)" if args.quant else
                 "copy (deepcopy, merge, fp16, save)", copied, time.perf_counter() - t))
    inplace = None
    if not args.quant:
        t = time.perf_counter()
        with PeakRSS() as inplace:
            model = model.merge_and_unload()      # consumes the model: last
            model.half().save_pretrained(os.path.join(work, "inplace"), max_shard_size=shard)
            del model
        runs.append(("in place (merge_and_unload, fp16, save)", inplace, time.perf_counter() - t))
    mb = 2**20
    print(f"model: Llama hidden {args.hidden}, {args.layers} layers, base "
          f"{args.quant or 'fp32'}; {out_bytes / 2e6:.1f} M merged weights "
          f"(fp16 output {out_bytes / mb:.0f} MiB), LoRA r=16 all-linear")
    print(f"shard: {shard / mb:.1f} MiB -> {result.shards} shards; estimate printed by "
          f"export_merged: {result.peak_memory_bytes / mb:.0f} MiB")
    print("| method | peak RSS growth (MiB) | growth / shard | growth / fp16 model | time (s) |")
    print("|---|---|---|---|---|")
    for name, m, s in runs:
        print(f"| {name} | {m.growth / mb:.0f} | {m.growth / shard:.2f} | "
              f"{m.growth / out_bytes:.2f} | {s:.1f} |")
    ratios = {"stream_growth/shard": stream.growth / shard,
              "stream_growth/fp16_model": stream.growth / out_bytes}
    if inplace is not None:
        ratios["inplace_growth/stream_growth"] = inplace.growth / max(stream.growth, 1)
        print(f"in-place merge / stream peak growth: {ratios['inplace_growth/stream_growth']:.1f}x")
    ratios["copy_growth/stream_growth"] = copied.growth / max(stream.growth, 1)
    print(f"{'merged_copy' if args.quant else 'deepcopy merge'} / stream peak growth: "
          f"{ratios['copy_growth/stream_growth']:.1f}x")
    _report.report("export_merged", ratios, {}, quick=args.quick,  # issue 11: "near one shard"
                   extra={"hidden": args.hidden, "layers": args.layers, "quant": args.quant,
                          "shard_mb": shard / mb, "shards": result.shards, "fp16_mib": out_bytes / mb,
                          "growth_mib": {n: m.growth / mb for n, m, _ in runs},
                          "seconds": {n: s for n, _, s in runs}})


if __name__ == "__main__":
    main()
