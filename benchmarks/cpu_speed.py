"""CPU training speed: fp32 against ``precision="auto"`` (bf16 autocast where the chip has native bf16),
measured against the chip's own matrix-product throughput in the same run (issue 22).

1. **The chip's limit**: ``--n``² × ``--n``² matrix products (2048 by default) in fp32 and in bf16, best
   of ``--matmul-reps``; FLOP/s = 2n³ / seconds.  On a CPU with AVX512-BF16 or AMX, oneDNN runs bf16
   GEMMs at about twice fp32's rate; elsewhere bf16 is emulated and slower.
2. **Training**: ``lora_lab.train`` with LoRA r=8 on all linear layers (and QLoRA: an NF4 base) of
   ``builtin:tiny`` and ``builtin:smollm2``, on rows of ``--batch`` × ``--seq`` random token ids, in
   three setups per model:

   * ``fp32``:     ``load_model(dtype="fp32")`` + ``TrainSpec(precision="fp32")`` (lora_lab before issue 22);
   * ``autocast``: the fp32 base + ``precision="bf16"`` (bf16 autocast, each weight converted to
     bf16 as it is multiplied: what a notebook that loads with the default dtype gets);
   * ``bf16``:     ``load_model(dtype="bf16")`` + ``precision="bf16"``: a bf16 frozen base (half the
     memory; the 4-bit layers compute in bf16) and bf16 autocast; the adapter stays fp32;
   * ``default`` (QLoRA only): ``load_model(quant="nf4")`` + ``TrainSpec()``, no dtype asked: the
     unquantized parts (embeddings, norms, LM head) stay fp32 while the 4-bit layers compute by
     the "auto" rule (bf16 for SmolLM2 on a bf16 CPU), under ``precision="auto"``;
   * ``compiled``: ``auto`` (``default`` for QLoRA) with ``TrainSpec(compile=True)``: the decoder
     layers through torch.compile (its first step compiles, and is in the warm-up).

   Under bf16 autocast on a CPU every setup runs the attention in fp32 (hf/model/attention.py):
   the run also times one causal attention forward + backward at SmolLM2's layer shape in fp32
   and in bf16 (best of ``--matmul-reps``), the reason for that choice.

   ``auto`` is whichever of these ``load_model(dtype="auto")`` + ``precision="auto"`` picks for the
   model on this chip (``bf16`` for SmolLM2 on a bf16 CPU, ``fp32`` for ``builtin:tiny``, whose
   hidden size 128 is below the 512 where bf16 starts to pay: hf/model/device.py).
   Tokens/s is counted over the steps after ``--warmup``, per second of wall time and per second of
   process CPU time × torch threads (the second moves less when other jobs share the machine).  The
   setups are interleaved ``--repeats`` times and the medians are reported.
3. **Fraction of the chip**: training FLOP/s over the matrix-product FLOP/s in the precision used,
   the probe of step 1 repeated right after each training run (the VM's speed drifts by ±12% over
   minutes, and a probe from the start of the run judged later runs against another moment); the
   median over repeats of each run's own fraction.
   FLOPs per token (Chowdhery et al. 2022, PaLM, appendix B, with a frozen base)::

       4·N_frozen + 6·N_adapter + 12·L·T·d

   N_frozen: weights of the frozen linear layers (the tied LM head included; forward 2N, backward
   2N for the input gradient, none for the frozen weight itself); N_adapter: the trainable
   parameters (6N, as for full training); 12·L·T·d: attention scores and their weighted sum over T
   positions (forward 4·T·d per layer, backward twice that).

On a CPU where torch multiplies bf16 in its own fallback (no native bf16 and no AVX512: an AMD EPYC
Zen 3 measured 0.3 GFLOP/s for a 2048² bf16 product against 108 in fp32) the bf16 rate is probed at 512²
once, the ``autocast`` and ``bf16`` setups are left out (``train()`` refuses bf16 there), and ``auto`` and
``compiled`` train in fp32, judged against the fp32 rate.  (An AVX512 CPU without native bf16 runs them:
oneDNN converts bf16 there.)  Where fp16 is emulated too (no AVX512-FP16), its rate is probed once at 512²
(train() refuses an fp16 base there: 1.3 GFLOP/s against 168 in fp32 on that chip).  Measured there (2
cores, idle, 2 repeats; the fp32 probe moved between 103 and 154 GFLOP/s over the run): SmolLM2 LoRA
trains in fp32 at 148 tokens/s, 66% of the chip's fp32 rate (runs: 62%, 70%), compiled 1.07× that (66%);
QLoRA 130 tokens/s (54%), compiled 1.10×; ``builtin:tiny`` 19%, compiled 1.51×.

Targets (issue 22, on a bf16 CPU): ``auto`` ≥ 1.5× ``fp32`` tokens/s on the real model, and training
reaching ≥ 60% of the chip's matrix throughput in the precision used, checked for ``auto`` (the
default, eager) and for ``compiled`` (opt-in).  On a machine shared with
other jobs the wall-clock numbers drop; compare only ratios from the same run.

What eager training has left, measured (so that nobody tries it again blind): ``compile=True``
fuses every elementwise pass between the matrix products and reaches 60–64%, which bounds what
any hand fusion in eager mode can win over eager's 54–60%.  Tried and not kept:

* a fused LoRA linear layer (one ``autograd.Function`` per layer: the scale folded into in-place
  ``addmm_``, the base's and the adapter's input gradients summed in place, the rank-r weight
  gradient as (aᵀ·g)ᵀ, 1.7× faster than gᵀ·a on oneDNN), matching peft's gradients to 1e-6 in fp32:
  1.013× bf16 and 0.991× fp32 tokens/s on SmolLM2 8 × 64, measured by switching it on and off
  *between steps* of one run (A B B A, 28 steps each); peak RSS of notebook 07's cell equal (1,636
  MiB, set by loading).  By the profiler its Python forward and backward (82 ms a step) cost about
  what the passes it removed did.  (An earlier per-run A/B read 0.88× the step
  time: the VM's drift, which is why step-level alternation is the protocol for small effects.)
* ``F.rms_norm`` for transformers' RMSNorm: its forward is 2.4× faster on a CPU, its backward
  slower, forward + backward 1.27× slower at SmolLM2's shape; a hand-written backward is 0.37 ms
  faster per norm (about 1.7% of a step over 61 norms) and was not pursued.
* the 47 MiB (504 × 49,152 bf16) logits chunk is above glibc's 32 MiB mmap ceiling
  (``hf/model/heap.py``), so each step faults it in afresh (12,097 minor faults a step: all of
  them are its pages): 17–25 ms more than a product into a reused buffer (idle, 4 alternations), 1.3–1.9%
  of a step; reusing one needs a buffer that outlives the step, not pursued.

    python benchmarks/cpu_speed.py [--quick] [--models builtin:tiny builtin:smollm2] [--no-qlora]
                                   [--setups fp32 bf16 compiled] [--steps N] [--repeats N]
                                   [--profile [SETUP ...]]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import torch

import lora_lab as ll
from lora_lab.hf.model.device import cpu_bf16_native, emulated_dtypes

SETUPS = {"fp32": ("fp32", "fp32", False), "autocast": ("fp32", "bf16", False),
          "bf16": ("bf16", "bf16", False), "default": (None, "auto", False),
          "compiled": ("auto", "auto", True)}


def auto_setup(model_name: str) -> str:
    """The setup ``dtype="auto"`` + ``precision="auto"`` amounts to for ``model_name`` here."""
    from lora_lab.hf.model.device import default_train_precision
    from lora_lab.hf.model.loading import _hidden_size

    return "bf16" if default_train_precision("cpu", _hidden_size(model_name)) == "bf16" else "fp32"


def matmul_gflops(dtype: torch.dtype, n: int, reps: int) -> float:
    """Best-of-``reps`` GFLOP/s of an n×n @ n×n product in ``dtype`` (2n³ FLOPs each)."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(dtype) for _ in range(2))
    a @ b  # warm-up: oneDNN picks and caches its kernel
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def attention_ms(dtype: torch.dtype, reps: int, shape=(8, 9, 3, 64, 64)) -> float:
    """Best-of-``reps`` ms of one causal SDPA forward + backward in ``dtype`` at SmolLM2's layer shape:
    ``(batch, query heads, key/value heads, tokens, head dim)``, keys and values repeated to the
    query heads as transformers does; what CPU flash attention costs per layer per step."""
    import torch.nn.functional as F

    b, h, kv, t, d = shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, n, t, d, generator=g).to(dtype).requires_grad_() for n in (h, kv, kv))

    def step():
        rep = h // kv
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                             is_causal=True)
        out.float().sum().backward()

    step()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


class _Clock(ll.Callback):
    """Wall and process-CPU time at the end of each optimizer step."""

    def __init__(self):
        self.times: list[tuple[float, float]] = []

    def on_step(self, state, control):
        self.times.append((time.perf_counter(), time.process_time()))


def flops_per_token(model, seq: int) -> float:
    """4·N_frozen + 6·N_adapter + 12·L·T·d (module docstring)."""
    frozen = adapter = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            n = module.in_features * module.out_features
            if module.weight.requires_grad:
                adapter += n
            else:
                frozen += n
    adapter += sum(p.numel() for p in model.parameters() if p.requires_grad) - adapter  # non-linear
    cfg = model.config
    return 4 * frozen + 6 * adapter + 12 * cfg.num_hidden_layers * seq * cfg.hidden_size


def rows(vocab: int, n: int, seq: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (n, seq), generator=g).tolist()
    return [{"input_ids": x, "attention_mask": [1] * seq, "labels": list(x)} for x in ids]


def train_setup(name: str, quant, setup: str, args, steps: int, callback):
    """Load ``name`` as ``setup`` asks, attach LoRA r=8 on all linear layers, train ``steps`` steps
    of random rows with ``callback``; (model, TrainResult)."""
    dtype, precision, compiled = SETUPS[setup]
    if quant and dtype == "auto":
        dtype = None  # as "default": a 4-bit base keeps its fp32 parts, its layers compute by "auto"
    model, tok = ll.load_model(name, quant, device="cpu", dtype=dtype)
    torch.manual_seed(0)
    model = ll.attach(model, ll.AdapterSpec(r=8, target_modules="all-linear"))
    with tempfile.TemporaryDirectory() as out:
        spec = ll.TrainSpec(steps=steps, batch_size=args.batch, lr=1e-4, precision=precision,
                            output_dir=out, schedule="constant", compile=compiled)
        res = ll.train(model, tok, rows(model.config.vocab_size, steps * args.batch, args.seq), None,
                       spec, callbacks=[callback])
    return model, res


def run_setup(name: str, quant, setup: str, args) -> dict:
    """Train ``warmup + steps`` steps; tokens/s (wall and CPU) and the run's precision."""
    clock = _Clock()
    model, res = train_setup(name, quant, setup, args, args.warmup + args.steps, clock)
    t = clock.times
    tokens = args.steps * args.batch * args.seq
    wall = tokens / (t[-1][0] - t[args.warmup - 1][0])
    cpu = tokens / ((t[-1][1] - t[args.warmup - 1][1]) / torch.get_num_threads())
    return {"wall": wall, "cpu": cpu, "precision": res.final["precision"], "loss": res.final["loss"],
            "flops_per_token": flops_per_token(model, args.seq)}


class _Profile(ll.Callback):
    """torch.profiler over two optimizer steps, from the end of step ``start``."""

    def __init__(self, start: int):
        self.start, self.prof, self.steps = start, None, 0

    def on_step(self, state, control):
        if state.step == self.start:
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.prof.__enter__()
        elif self.prof is not None and self.steps < 2:
            self.steps += 1
            if self.steps == 2:
                self.prof.__exit__(None, None, None)


def profile_setup(name: str, setup: str, args, chip: dict) -> dict:
    """Where a step's time goes (``--profile``): the top operators by self time over two steps, and
    the matrix products' share of the step and their rate against the chip's (FLOPs 4·N_frozen +
    6·N_adapter per token: ``flops_per_token`` without its attention term)."""
    prof = _Profile(args.warmup)
    model, res = train_setup(name, None, setup, args, args.warmup + 3, prof)
    events = [e for e in prof.prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    mm = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
    cfg = model.config
    mm_flops = (flops_per_token(model, args.seq) - 12 * cfg.num_hidden_layers * args.seq * cfg.hidden_size)
    mm_gflops = mm_flops * 2 * args.batch * args.seq / (mm / 1e6) / 1e9
    peak = chip["bf16" if res.final["precision"].startswith("bf16") else "fp32"]
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:6]
    print(f"\nprofile of {name} {setup} ({res.final['precision']}), two steps of {args.batch} × {args.seq}:")
    for e in top:
        print(f"  {e.self_cpu_time_total / total:6.1%}  {e.key[:70]}")
    print(f"  matrix products: {mm / total:.0%} of the step, at {mm_gflops:.0f} GFLOP/s = "
          f"{mm_gflops / peak:.0%} of the chip's {peak:.0f}", flush=True)
    return {"mm_share": round(mm / total, 3), "mm_gflops": round(mm_gflops, 1),
            "mm_of_chip": round(mm_gflops / peak, 3),
            "top": {e.key[:70]: round(e.self_cpu_time_total / total, 3) for e in top}}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["builtin:tiny", "builtin:smollm2"])
    ap.add_argument("--no-qlora", action="store_true")
    ap.add_argument("--steps", type=int, default=None, help="measured steps (after warmup)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--n", type=int, default=2048, help="matrix size of the matmul probe")
    ap.add_argument("--matmul-reps", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="fewer steps and one repeat (a smoke run)")
    ap.add_argument("--profile", nargs="*", default=None, metavar="SETUP",
                    help="after the timed runs, profile two steps of these setups on the last model "
                         "(default: the auto setup and compiled)")
    ap.add_argument("--setups", nargs="+", choices=list(SETUPS), default=list(SETUPS),
                    help="which setups to run (fp32, the baseline, always runs)")
    args = ap.parse_args(argv)
    args.setups = ["fp32", *(s for s in SETUPS if s in args.setups and s != "fp32")]
    args.steps = args.steps or (3 if args.quick else 6)
    args.repeats = args.repeats or (1 if args.quick else 2)

    native, slow = cpu_bf16_native(), emulated_dtypes()
    # where torch multiplies bf16 in its own fallback a 2048² product takes about a minute (0.3 GFLOP/s
    # on an AMD EPYC Zen 3): its rate is probed once at 512², and the bf16 setups, which train()
    # refuses there, are left out (an AVX512 CPU without native bf16 runs them, through oneDNN)
    fallback = torch.bfloat16 in slow
    n16, reps16 = (512, 1) if fallback else (args.n, args.matmul_reps)
    chip = {"fp32": matmul_gflops(torch.float32, args.n, args.matmul_reps),
            "bf16": matmul_gflops(torch.bfloat16, n16, reps16)}
    print(f"CPU native bf16: {native}; matmul: fp32 {chip['fp32']:.0f} GFLOP/s ({args.n}²), bf16 "
          f"{chip['bf16']:.1f} GFLOP/s ({n16}²): bf16 at {chip['bf16'] / chip['fp32']:.3f}× fp32", flush=True)
    if torch.float16 in slow:  # train() refuses an fp16 base here too (hf/model/device.py)
        chip["fp16"] = matmul_gflops(torch.float16, 512, 1)
        print(f"  fp16 is emulated too: {chip['fp16']:.1f} GFLOP/s (512²)", flush=True)
    if fallback:
        dropped = [s for s in args.setups if s in ("autocast", "bf16")]
        args.setups = [s for s in args.setups if s not in dropped]
        print(f"  bf16 is emulated on this CPU: setups {dropped or 'none'} left out (train() refuses them); "
              "'auto' and 'compiled' train in fp32 here", flush=True)
    attn = {"fp32": attention_ms(torch.float32, args.matmul_reps)}
    if not fallback:
        attn["bf16"] = attention_ms(torch.bfloat16, args.matmul_reps)
    print(f"attention forward + backward, SmolLM2's layer shape: fp32 {attn['fp32']:.2f} ms"
          + (f", bf16 {attn['bf16']:.2f} ms (why bf16 autocast runs it in fp32 on a CPU)" if "bf16" in attn
             else ""),
          flush=True)

    configs = [(m, q) for m in args.models for q in ((None,) if args.no_qlora else (None, "nf4"))]
    results: dict = {}
    for _ in range(args.repeats):
        for model_name, quant in configs:
            for setup in args.setups:
                if (quant and setup == "autocast") or (not quant and setup == "default"):
                    continue  # a 4-bit base has no fp32 weights to autocast; LoRA's default IS autocast
                r = run_setup(model_name, quant, setup, args)
                # the chip's rate right after this run, in its precision: the VM's speed drifts
                # over minutes, so each run is judged against its own moment
                dtype = torch.bfloat16 if r["precision"].startswith("bf16") else torch.float32
                r["chip"] = matmul_gflops(dtype, args.n, args.matmul_reps)
                r["fraction"] = r["wall"] * r["flops_per_token"] / 1e9 / r["chip"]
                results.setdefault((model_name, quant, setup), []).append(r)
                print(f"  {model_name:16} {quant or 'lora':5} {setup:9} {r['precision']:14} "
                      f"{r['wall']:7.0f} tokens/s wall, {r['cpu']:7.0f} per CPU-s  (loss {r['loss']:.3f}; "
                      f"chip {r['chip']:.0f} GFLOP/s after it: {r['fraction']:.0%})",
                      flush=True)

    print("\n| model | base | setup | precision | tokens/s (wall) | per CPU-s | × fp32 | GFLOP/s | "
          "of chip |\n|---|---|---|---|---|---|---|---|---|")
    ratios, extra = {}, {"chip_gflops": chip, "attention_ms": attn, "cpu_bf16_native": native,
                         "batch": args.batch, "seq": args.seq, "steps": args.steps, "repeats": args.repeats}
    for (model_name, quant, setup), runs in results.items():
        wall = statistics.median(r["wall"] for r in runs)
        cpu = statistics.median(r["cpu"] for r in runs)
        base = statistics.median(r["wall"] for r in results[(model_name, quant, "fp32")])
        prec = runs[0]["precision"]
        gflops = wall * runs[0]["flops_per_token"] / 1e9
        frac = statistics.median(r["fraction"] for r in runs)  # each run against the probe after it
        short = model_name.split(":")[-1]
        key = f"{short}_{quant or 'lora'}_{setup}"
        if setup != "fp32":
            ratios[f"{key}_vs_fp32"] = round(wall / base, 3)
        ratios[f"{key}_chip_fraction"] = round(frac, 3)
        if setup == auto_setup(model_name):
            ratios[f"{short}_{quant or 'lora'}_auto_vs_fp32"] = round(wall / base, 3)
            ratios[f"{short}_{quant or 'lora'}_auto_chip_fraction"] = round(frac, 3)
            extra[f"{short}_{quant or 'lora'}_auto_is"] = setup
        extra[f"{key}_tokens_per_s"] = round(wall, 1)
        extra[f"{key}_tokens_per_cpu_s"] = round(cpu, 1)
        print(f"| {model_name} | {quant or 'fp32/bf16'} | {setup} | {prec} | {wall:,.0f} | {cpu:,.0f} | "
              f"{wall / base:.2f} | {gflops:.0f} | {frac:.0%} |")
    if args.profile is not None:
        for setup in args.profile or [auto_setup(args.models[-1]), "compiled"]:
            extra[f"profile_{setup}"] = profile_setup(args.models[-1], setup, args, chip)
    targets = {}
    if native and "builtin:smollm2" in args.models:
        targets = {"smollm2_lora_auto_vs_fp32": ">= 1.5", "smollm2_lora_auto_chip_fraction": ">= 0.6",
                   "smollm2_lora_compiled_chip_fraction": ">= 0.6"}
    try:
        from _report import report
    except ImportError:  # run from elsewhere than benchmarks/
        sys.path.insert(0, __file__.rsplit("/", 1)[0])
        from _report import report
    return report("cpu_speed", ratios, targets, quick=args.quick, extra=extra)


if __name__ == "__main__":
    main()
