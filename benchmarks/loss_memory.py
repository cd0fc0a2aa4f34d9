"""What does the chunked causal-LM loss save in memory, and what does it cost in speed (issue 19)?

One LoRA training step (forward, backward, AdamW step; r=8 on all linear layers, fp32 on a CPU,
the Trainer's dtype rules on a GPU) with the full-vocabulary loss (transformers' ``model(**batch)
.loss``) and with ``lora_lab.hf.training.chunked_loss`` (``--chunk`` tokens of logits at a time),
on two models:

1. ``random-128k``: a random Llama config with Llama 3's 128,256-token vocabulary and a small
   hidden size (256, 2 layers), batch 2 × 1536: the logits are nearly everything
   (2·1536·128,256·12 B = 4.4 GiB for the full loss, 0.73 GiB for one 512-token chunk);
2. ``builtin:smollm2`` (SmolLM2-135M, vocabulary 49,152) when it is installed, batch 2 × ``--smollm2-seq``
   (1536).

Each (model, loss) runs in its own subprocess, ``--repeats`` times, interleaved.  In each: one
warm-up step (optimizer state, first-touch allocations), then ``--steps`` measured steps.
*Extra peak*: the peak over the measured steps above the memory just before them — on a CPU the
resident size (``VmHWM`` reset through ``/proc/self/clear_refs``, as in
``lora_lab.train.measure.peak_rss_mb``; ``getrusage`` would report the parent's peak), on a GPU
``torch.cuda.max_memory_allocated`` after a reset.  *Speed*: tokens per second of the measured
steps, per second of the process's CPU time on a CPU (what to trust on a shared machine) and of
wall time on a GPU.  Targets (issue 19): extra peak chunked/full ≤ 0.5, speed chunked/full ≥ 0.95.

    python benchmarks/loss_memory.py                 # both models, 3 steps, 2 repeats
    python benchmarks/loss_memory.py --quick         # random-128k only, 1 × 1024, chunk 256, 1 repeat
    python benchmarks/loss_memory.py --no-smollm2 --repeats 3 --chunk 1024
    python benchmarks/loss_memory.py --quick --vocab 32000   # where chunked_loss="auto" turns on

The last line of the output is the JSON line of ``benchmarks/_report.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import _report

TARGETS = {"extra_peak": "<= 0.5", "speed": ">= 0.95"}
RANDOM = dict(vocab_size=128_256, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
              tie_word_embeddings=True)


# ----------------------------------------------------------------------------- child
def _load(model_name: str, device: str, vocab: int):
    import torch

    import lora_lab as ll

    if model_name.startswith("random-"):
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**{**RANDOM, "vocab_size": vocab})).to(device)
    else:
        model, _ = ll.load_model(model_name, device=device)
    model.config.use_cache = False
    torch.manual_seed(1)
    return ll.attach(model, ll.AdapterSpec(r=8, target_modules="all-linear"))


def child(model_name: str, chunked: bool, batch: int, seq: int, steps: int, chunk: int,
          vocab: int) -> dict:
    import torch

    from lora_lab.hf.training.chunked_loss import chunked_causal_lm_loss
    from lora_lab.train.measure import peak_rss_mb, reset_peak_rss, rss_mb

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = _load(model_name, device, vocab)
    model.train()
    vocab = model.get_base_model().get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    data = {"input_ids": ids, "labels": ids}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    dtype = torch.float32 if device == "cpu" else (
        torch.bfloat16 if torch.cuda.get_device_capability()[0] >= 8 else torch.float16)

    def step() -> float:
        with torch.autocast(device, dtype=dtype, enabled=device != "cpu"):
            if chunked:
                total, n = chunked_causal_lm_loss(model, data, chunk_size=chunk, use_cache=False)
                loss = total / n
            else:
                loss = model(**data, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    first = step()                                    # warm-up: optimizer state, first touches
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()                              # VmHWM := the current RSS
        before = rss_mb() * 2**20
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss_mb() * 2**20
    tokens = steps * batch * seq
    return {"model": model_name, "chunked": chunked, "device": device, "vocab": int(vocab),
            "first_loss": first, "extra_peak_mb": (peak - before) / 2**20,
            "tokens_per_s_wall": tokens / wall, "tokens_per_s_cpu": tokens / max(cpu, 1e-9),
            "threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------- parent
def _run_child(args, model_name: str, chunked: bool, batch: int, seq: int) -> dict:
    cmd = [sys.executable, __file__, "--child", model_name, "1" if chunked else "0", str(batch),
           str(seq), str(args.steps), str(args.chunk), str(args.vocab)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(f"child {model_name} chunked={chunked} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _smollm2_present() -> bool:
    try:
        from lora_lab.hf.model.builtin import resolve_builtin

        resolve_builtin("builtin:smollm2")
        return True
    except Exception:  # noqa: BLE001 - not installed or not cached: skip it
        return False


def compare(args, model_name: str, batch: int, seq: int) -> dict:
    runs = {False: [], True: []}
    for _ in range(args.repeats):                     # interleaved: full, chunked, full, ...
        for chunked in (False, True):
            runs[chunked].append(_run_child(args, model_name, chunked, batch, seq))
    med = {c: {k: statistics.median(r[k] for r in runs[c])
               for k in ("extra_peak_mb", "tokens_per_s_wall", "tokens_per_s_cpu")} for c in runs}
    speed_key = "tokens_per_s_wall" if runs[True][0]["device"] == "cuda" else "tokens_per_s_cpu"
    ratios = {"extra_peak": med[True]["extra_peak_mb"] / med[False]["extra_peak_mb"],
              "speed": med[True][speed_key] / med[False][speed_key],
              "speed_wall": med[True]["tokens_per_s_wall"] / med[False]["tokens_per_s_wall"]}
    loss_gap = abs(runs[True][0]["first_loss"] - runs[False][0]["first_loss"])
    print(f"\n{model_name} (vocab {runs[True][0]['vocab']:,}), batch {batch} x {seq}, "
          f"{runs[True][0]['device']}, chunk {args.chunk}, median of {args.repeats}:")
    for c, name in ((False, "full"), (True, "chunked")):
        m = med[c]
        print(f"  {name:8s} extra peak {m['extra_peak_mb']:8,.0f} MiB   "
              f"{m['tokens_per_s_cpu']:8,.0f} tokens/s (CPU time)  {m['tokens_per_s_wall']:8,.0f} (wall)")
    print(f"  extra peak chunked/full {ratios['extra_peak']:.3f} (target {TARGETS['extra_peak']}),"
          f"  speed {ratios['speed']:.3f} (target {TARGETS['speed']}; wall {ratios['speed_wall']:.3f}),"
          f"  first-step loss gap {loss_gap:.2e}")
    return {"ratios": ratios, "median": {str(k): v for k, v in med.items()}, "loss_gap": loss_gap,
            "batch": batch, "seq": seq}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true",
                    help="random-128k only, batch 1 x 1024, chunk 256, 1 repeat")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=1536)
    ap.add_argument("--smollm2-seq", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=RANDOM["vocab_size"],
                    help="the random model's vocabulary (e.g. 32000: where chunked_loss='auto' starts)")
    ap.add_argument("--no-smollm2", action="store_true")
    ap.add_argument("--only-smollm2", action="store_true")
    args = ap.parse_args()
    if args.child:
        name, chunked, batch, seq, steps, chunk, vocab = args.child
        print(json.dumps(child(name, chunked == "1", int(batch), int(seq), int(steps), int(chunk),
                               int(vocab))))
        return
    if args.quick:
        args.batch, args.seq, args.repeats, args.steps, args.no_smollm2 = 1, 1024, 1, 2, True
        args.chunk = min(args.chunk, 256)
    random = "random-128k" if args.vocab == RANDOM["vocab_size"] else f"random-{args.vocab // 1000}k"
    results = {} if args.only_smollm2 else {random: compare(args, random, args.batch, args.seq)}
    if not args.no_smollm2 and _smollm2_present():
        results["smollm2"] = compare(args, "builtin:smollm2", args.batch, args.smollm2_seq)
    ratios = {f"{k}_{name}": v for name, r in results.items() for k, v in r["ratios"].items()}
    targets = {f"{k}_{name}": t for name in results for k, t in TARGETS.items()}
    import torch  # noqa: F401 - so that the report names the running torch build and threads

    _report.report("loss_memory", ratios, targets, quick=args.quick,
                   extra={"chunk": args.chunk, "steps": args.steps, "repeats": args.repeats,
                          **{name: {k: v for k, v in r.items() if k != "ratios"}
                             for name, r in results.items()}})


if __name__ == "__main__":
    main()
