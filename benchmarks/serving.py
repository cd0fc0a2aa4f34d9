"""Benchmark: serving many adapters from one base model (issue 17): a batch spread over K adapters
against the same batch on one adapter, switch latency, and hot-swap against load_adapter.

Run:  nice python benchmarks/serving.py [--quick] [--no-smollm2] [--threads 1] [--rows 16]
                                        [--tokens 16] [--repeats 7]

On builtin:tiny and, when it is installed and not ``--no-smollm2``, builtin:smollm2 (SmolLM2-135M),
each model gets 16 LoRA adapters (r = 8, alpha = 16, all linear layers, B drawn N(0, 0.05²) so they
change the outputs).  Three measurements per model, each with one protocol on both sides, in one
process, torch on ``--threads`` threads:

* **K adapters vs one** (:func:`lora_lab.hf.generate.throughput.mixed_throughput`): one batch of
  ``--rows`` prompts completed greedily with the KV cache by ``lora_lab.generate``; *single*: every
  row on k0; *K*: row i on k(i mod K), K = 1, 2, 4, 8, 16; *base*: adapters off.  One warm-up per
  side, then ``--repeats`` interleaved rounds, median seconds per decoding step.  The ratio
  ``mixed_K_vs_single`` is mixed throughput as a fraction of single-adapter throughput.  Target
  (issue 17): >= 0.75 at K = 4, on each model (peft's own test bounds a mixed batch at > 0.5).
* **switch**: median time of ``lora_lab.set_adapter`` between two loaded adapters (k0 <-> k1, 50
  switches after 5 warm-up ones); ``switch_vs_step`` = one switch as a fraction of one decoding step
  of the single-adapter batch (what switching per request would add per step).
* **hot-swap**: median time of ``lora_lab.hotswap_adapter`` (copy a saved adapter's tensors into a
  loaded slot) against ``lora_lab.load_adapter`` + ``delete_adapter`` of the new one (what replacing
  an adapter costs otherwise), same saved adapter, interleaved, ``--repeats`` times (one warm-up).

Timings on a shared machine move with its load (recorded in the JSON line): compare only ratios of
the same run.  The last line of output is one JSON object (``_report.py``).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _report import report

import lora_lab as ll
from lora_lab.errors import LoraLabError
from lora_lab.hf.generate.throughput import mixed_throughput

PROMPTS = ["reverse abc", "upper hello world", "copy xyz", "sort dcba", "reverse lora",
           "upper mixed batch", "copy adapters", "reverse one two"]
KS = (1, 2, 4, 8, 16)


def _model(name: str, k: int):
    model, tok = ll.load_model(name, device="cpu")
    g = torch.Generator().manual_seed(0)
    for i in range(k):
        model = ll.attach(model, ll.AdapterSpec(r=8, alpha=16, target_modules="all-linear"), name=f"k{i}")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval(), tok


def bench_switch(model, n: int = 50) -> float:
    """Median seconds of one ``ll.set_adapter`` between two loaded adapters."""
    times = []
    for i in range(n + 5):
        t0 = time.perf_counter()
        ll.set_adapter(model, "k1" if i % 2 == 0 else "k0")
        times.append(time.perf_counter() - t0)
    ll.set_adapter(model, "k0")
    return statistics.median(times[5:])


def bench_hotswap(model, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        path = ll.save_adapter(model, Path(d) / "k1", adapter="k1")
        swap, load = [], []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            ll.hotswap_adapter(model, path, "k0")
            swap.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            model = ll.load_adapter(model, path, name="fresh", activate=False)
            ll.delete_adapter(model, "fresh")
            load.append(time.perf_counter() - t0)
    return {"hotswap_s": statistics.median(swap[1:]), "load_s": statistics.median(load[1:])}


def bench_model(name: str, rows: int, tokens: int, repeats: int) -> tuple[dict, dict]:
    model, tok = _model(name, max(KS))
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(rows)]
    recs = mixed_throughput(model, tok, prompts, [f"k{i}" for i in range(max(KS))], KS,
                            max_new_tokens=tokens, repeats=repeats, label=name)
    single = next(r for r in recs if r["way"] == "single")
    print(f"{name}: {rows} rows, up to {tokens} new tokens, median of {repeats} "
          f"(threads {torch.get_num_threads()})")
    ratios = {}
    for r in recs:
        if r["way"] == "single":
            continue
        key = "base" if r["way"] == "base" else f"mixed_{r['adapters']}"
        ratios[f"{key}_vs_single"] = r["vs_single"]
        print(f"  {key:>9}: {r['ms_per_step']:8.2f} ms/step  {r['tokens_per_s']:8.1f} tokens/s  "
              f"vs single adapter ({single['ms_per_step']:.2f} ms/step): {r['vs_single']:.3f}"
              f"  [{r['batch_mode']}]")
    switch = bench_switch(model)
    ratios["switch_vs_step"] = switch / (single["ms_per_step"] / 1e3)
    h = bench_hotswap(model, repeats)
    ratios["load_vs_hotswap"] = h["load_s"] / h["hotswap_s"]
    print(f"  set_adapter {switch * 1e3:.3f} ms ({ratios['switch_vs_step']:.3f} of a decoding step); "
          f"hot-swap {h['hotswap_s'] * 1e3:.1f} ms vs load_adapter+delete {h['load_s'] * 1e3:.1f} ms "
          f"({ratios['load_vs_hotswap']:.1f}x)")
    extra = {"records": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                         for r in recs],
             "switch_ms": round(switch * 1e3, 4), "hotswap_ms": round(h["hotswap_s"] * 1e3, 3),
             "load_ms": round(h["load_s"] * 1e3, 3)}
    return ratios, extra


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8 new tokens, 3 repeats")
    ap.add_argument("--no-smollm2", action="store_true", help="builtin:tiny only")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = max(args.rows, max(KS))                       # K = 16 needs 16 rows
    tokens = min(args.tokens, 8) if args.quick else args.tokens
    repeats = min(args.repeats, 3) if args.quick else args.repeats
    models = {"tiny": "builtin:tiny", "smollm2": "builtin:smollm2"}
    ratios, targets, extra = {}, {}, {"rows": rows, "tokens": tokens, "repeats": repeats, "models": {}}
    for short, name in models.items():
        if short == "smollm2" and args.no_smollm2:
            continue
        try:
            got, more = bench_model(name, rows, tokens, repeats)
        except LoraLabError as err:                       # SmolLM2 not installed: say so, go on
            if short == "tiny":
                raise
            print(f"{name}: skipped ({err.problem})")
            continue
        ratios.update({f"{short}/{k}": v for k, v in got.items()})
        targets[f"{short}/mixed_4_vs_single"] = ">= 0.75"
        extra["models"][short] = more
    report("serving", ratios, targets, quick=args.quick, extra=extra)


if __name__ == "__main__":
    main()
