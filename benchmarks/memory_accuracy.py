"""Benchmark: how close is ``estimate_memory`` to what training really uses?

Run:  nice python benchmarks/memory_accuracy.py            # CPU checks + published references
      python benchmarks/memory_accuracy.py --quick    # the same on the builtin model, 2 activation cases
      python benchmarks/memory_accuracy.py --gpu            # + real training steps on a CUDA GPU
      python benchmarks/memory_accuracy.py --rss            # peak RSS of planning 8B and 70B
      python benchmarks/memory_accuracy.py --cpu-rss MODEL  # peak RSS of training on the CPU

**CPU (exact oracles).**  On config-built Llamas and the builtin model: trainable parameters, adapter
bytes, gradient bytes (after a real backward) and AdamW state bytes (after a real ``step``) against
the estimate's terms; 4-bit storage against bitsandbytes; and the *activation* term against the
bytes autograd really keeps: every tensor saved for backward during a bf16 forward and loss
(``torch.autograd.graph.saved_tensors_hooks``, deduplicated by storage), compared with
``activations + T·V·4`` (the kept log-softmax) of the estimate without checkpointing.

**CPU RSS (``--cpu-rss FOLDER``).**  LoRA r=8 on all linear layers and full fine-tuning of the model
in FOLDER (e.g. SmolLM2-135M-Instruct in fp32), 3 steps of batch 8 × 64 tokens (fused AdamW, unpadded
and padded rows), each in a fresh process: the peak resident size (``VmHWM``) against
``estimate_memory(..., device="cpu").need()``.

**GPU (``--gpu``, needs CUDA).**  Llama-shaped models built from configs (≈0.1B to 1.2B; one with a
128k vocabulary), in bf16 and fp16, LoRA and QLoRA (NF4 + double quant), with and without
gradient checkpointing: 3 training steps each (fused AdamW, autocast), then
``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` of the last step against
``peak_allocated()`` / ``peak_reserved()``.  Target: within ±15%.  Writes ``$OUT/memory_gpu.json``
when ``OUT`` is set.

**Published measurements (cited, not re-run).**

* torchtune README, "Memory and training speed" (pytorch/torchtune, README.md at commit
  0031bfb080bd35ec533c412df883cf2bf7bf7fe4): Llama 3.1 8B, batch 2, packed to 2048 tokens,
  torch.compile on: LoRA 16.2 GiB (1x 4090) and 30.3 GiB (1x A6000), QLoRA 7.4 GiB (1x 4090).
  Recipe configs (recipes/configs/llama3_1/8B_lora_single_device.yaml, 8B_qlora_single_device.yaml):
  LoRA r=8, α=16 on q, v, output_proj and the MLP (QLoRA adds k), bf16, fused AdamW, activation
  checkpointing on, chunked cross-entropy.  The README does not say what differs between the 4090
  and A6000 LoRA rows.
* peft method comparison (huggingface/peft, method_comparison/MetaMathQA/results/*.json; measured
  on an NVIDIA L40S): Llama-3.2-3B in bf16 (no autocast), batch 4, max_seq_length 768 (samples
  shorter, bucketed by length), AdamW, no gradient checkpointing.  ``accelerator_memory_reserved_99th``
  (reserved after each step, 99th percentile) and ``..._max`` (max reserved over the run, including
  evaluation by generation with batch 50):
  LoRA r=32 on q,v (lora--llama-3.2-3B-rank32.json): 17,710,763,212 / 22,273,851,392 bytes;
  DoRA r=32 on q,v (lora--llama-3.2-3B-rank32-dora.json): 22,171,090,944 / 24,540,872,704 bytes;
  full fine-tuning (full-finetuning--llama-3.2-3B-lr_0.00001.json): 33,573,390,254 / 37,241,225,216.
  Their trainable counts (9,175,040 for LoRA; 9,289,728 for DoRA) are checked exactly below.

The last line of the output is the JSON line of ``benchmarks/_report.py``: the share of exact byte
cases (target 1), the range of estimate / measured ratios of each check, and with ``--gpu`` the share
of runs within ±15%.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings

import torch
from transformers import LlamaConfig

import lora_lab as ll
from lora_lab.core import memory as mem
from lora_lab.hf.model.facts import model_facts
from lora_lab.hf.model.plan import estimate_memory

GIB = mem.GIB
LLAMA31_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                  "tie_word_embeddings": False}
LLAMA32_3B = {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
                  "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
                  "tie_word_embeddings": True}
LLAMA_70B = {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                 "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256}
TINY = {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 3, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 1000}


# ----------------------------------------------------------------------------- CPU oracles
def cpu_parameter_and_optimizer_terms(quick: bool = False) -> tuple[int, int]:
    """``(exact, cases)``: how many (model, spec) cases match every byte count exactly."""
    print("== CPU: parameters, adapter, gradient and AdamW-state bytes (exact oracles) ==")
    exact = cases = 0
    specs = [ll.AdapterSpec(r=8), ll.AdapterSpec(r=4, target_modules="attention-qv"),
             ll.AdapterSpec(r=4, use_dora=True, target_modules="attention"),
             ll.AdapterSpec(method="ia3"), ll.AdapterSpec(method="prompt", num_virtual_tokens=8),
             None]                                        # None: full fine-tuning (fp32 on CPU)
    for source in ("builtin:tiny-random",) + (() if quick else (LlamaConfig(**TINY),)):
        for spec in specs:
            est = estimate_memory(source, spec, optimizer="adamw", device="cpu")
            if isinstance(source, str):
                model, _ = ll.load_model(source, device="cpu")
            else:
                from transformers import AutoModelForCausalLM
                model = AutoModelForCausalLM.from_config(source)
            model = ll.attach(model, spec) if spec is not None else model
            params = [p for p in model.parameters() if p.requires_grad]
            ids = torch.randint(0, model.config.vocab_size, (2, 16))
            model(input_ids=ids, labels=ids).loss.backward()
            opt = torch.optim.AdamW(params)
            opt.step()
            grads = sum(p.grad.numel() * p.grad.element_size() for p in params)
            states = sum(v.numel() * v.element_size() for s in opt.state.values()
                         for k, v in s.items() if k in ("exp_avg", "exp_avg_sq"))
            t, name = est.breakdown, getattr(source, "model_type", source)
            weights = t["adapter_weights"] if spec is not None else t["base_weights"]
            ok = (est.trainable[est.chosen] == sum(p.numel() for p in params)
                  and weights == sum(p.numel() * p.element_size() for p in params)
                  and t["gradients_total"] == grads and t["optimizer_states"] == states)
            print(f"  {name:<20} {est.chosen:<7} trainable {est.trainable[est.chosen]:>9,}  "
                  f"grads {grads:>10,} B  AdamW {states:>10,} B  {'exact' if ok else 'MISMATCH'}")
            exact, cases = exact + ok, cases + 1
    return exact, cases


def saved_bytes(model, ids, mask=None) -> int:
    """Bytes of the distinct storages autograd keeps for backward during forward + loss."""
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        seen.setdefault(st.data_ptr(), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    del loss
    return sum(n for ptr, n in seen.items() if ptr not in params)


def cpu_activation_term(quick: bool = False) -> list[float]:
    """Kept activations + the kept fp32 log-probs, against what autograd saves on CPU (bf16
    autocast, no checkpointing): LoRA unpadded and padded, and QLoRA (bitsandbytes NF4 on CPU).
    Returns the ratios estimate / measured, one per case (``quick``: the first and the last)."""
    print("== CPU: activation term vs tensors autograd keeps (bf16 autocast, no checkpointing) ==")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_lab.hf.model.builtin import TOKENIZER_DIR

    cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, vocab_size=4000)
    cases = ((ll.AdapterSpec(r=8), None, 2, 128, False), (ll.AdapterSpec(r=8), None, 4, 256, False),
             (ll.AdapterSpec(r=16, target_modules="attention-qv"), None, 4, 256, False),
             (ll.AdapterSpec(r=8), None, 4, 256, True),
             (ll.AdapterSpec(r=8), ll.QuantSpec(compute_dtype="bfloat16"), 4, 256, False))
    cases = (cases[0], cases[-1]) if quick else cases
    ratios = []
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
        AutoTokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(folder)
        for spec, quant, batch, seq, padded in cases:
            model, _ = ll.load_model(folder, quant=quant, device="cpu", dtype="bfloat16")
            model = ll.attach(model, spec)
            model.train()
            ids = torch.randint(0, cfg.vocab_size, (batch, seq))
            mask = None
            if padded:                          # right padding on every other row
                mask = torch.ones_like(ids)
                mask[::2, seq // 2:] = 0
            with torch.autocast("cpu", dtype=torch.bfloat16):
                measured = saved_bytes(model, ids, mask)
            est = estimate_memory(cfg, spec, quant=quant, batch_size=batch, seq_len=seq,
                                  gradient_checkpointing=False, padded=padded)
            modelled = est.breakdown["activations"] + batch * seq * cfg.vocab_size * 4
            what = f"{est.chosen} {spec.target_modules}" + (" padded" if padded else "")
            print(f"  {what:<32} b={batch} s={seq}: kept {measured / 2**20:7.2f} MiB, "
                  f"estimated {modelled / 2**20:7.2f} MiB, ratio {modelled / measured:.3f}")
            ratios.append(modelled / measured)
    return ratios


# ----------------------------------------------------------------------------- references
def _tt_adjusted(est, scenario: str, chunks: int = 8) -> float:
    """torchtune differs from HF in two documented ways: chunked cross-entropy (the fp32 upcast
    and gradient exist for 1/chunks of the logits at a time) and a bf16 (not fp32) unquantized
    rest on a QLoRA base.  Returns the estimate's peak reserved with those two terms swapped."""
    t = est.scenarios[scenario]
    T = est.batch_size * est.seq_len
    facts = model_facts(LlamaConfig(**LLAMA31_8B))
    logits = T * facts.arch.vocab * (2 + 12 / chunks)
    rest = facts.unquantized_params * 2 if "Q" in scenario else 0
    return est.peak_reserved(scenario) - t["logits"] + logits - rest


def published_references() -> list[dict]:
    print("== Published peaks vs the estimate (peak reserved, GiB) ==")
    rows = []
    tt_lora = ll.AdapterSpec(r=8, alpha=16, target_modules=("q_proj", "v_proj", "o_proj",
                                                            "gate_proj", "up_proj", "down_proj"))
    tt_qlora = tt_lora.replace(target_modules=("q_proj", "k_proj", "v_proj", "o_proj",
                                               "gate_proj", "up_proj", "down_proj"))
    cfg8 = LlamaConfig(**LLAMA31_8B)
    e = estimate_memory(cfg8, tt_lora, batch_size=2, seq_len=2048, gradient_checkpointing=True,
                        device=24, padded=False)
    for label, gib in (("1x 4090", 16.2), ("1x A6000", 30.3)):
        rows.append({"source": "torchtune README", "setup": f"Llama 3.1 8B LoRA ({label})",
                         "published_gib": gib, "estimate_gib": e.peak_reserved("LoRA") / GIB,
                         "adjusted_gib": _tt_adjusted(e, "LoRA") / GIB})
    e = estimate_memory(cfg8, tt_qlora, quant="nf4", batch_size=2, seq_len=2048, device=24,
                        gradient_checkpointing=True, padded=False)   # packed: no padding mask
    rows.append({"source": "torchtune README", "setup": "Llama 3.1 8B QLoRA (1x 4090)",
                     "published_gib": 7.4, "estimate_gib": e.peak_reserved("QLoRA") / GIB,
                     "adjusted_gib": _tt_adjusted(e, "QLoRA") / GIB})
    cfg3 = LlamaConfig(**LLAMA32_3B)
    qv = ll.AdapterSpec(r=32, alpha=64, target_modules=("q_proj", "v_proj"))
    peft_rows = ((qv, "LoRA", 17_710_763_212, 22_273_851_392, 9_175_040),
                 (qv.replace(use_dora=True), "DoRA", 22_171_090_944, 24_540_872_704, 9_289_728),
                 (qv, "full FT", 33_573_390_254, 37_241_225_216, 3_212_749_824))
    for spec, scen, p99, pmax, n in peft_rows:
        e = estimate_memory(cfg3, spec, batch_size=4, seq_len=768, gradient_checkpointing=False,
                            device=48)
        assert e.trainable[scen] == n, (scen, e.trainable[scen], n)   # exact, as published
        for what, value in (("reserved 99th pct", p99), ("reserved max", pmax)):
            rows.append({"source": "peft MetaMathQA", "setup": f"Llama-3.2-3B {scen} ({what})",
                             "published_gib": value / GIB, "estimate_gib": e.peak_reserved(scen) / GIB,
                             "adjusted_gib": float("nan")})
    print(f"  {'source':<17} {'setup':<42} {'published':>9} {'estimate':>9} {'ratio':>6} "
          f"{'adjusted':>9}")
    for r in rows:
        print(f"  {r['source']:<17} {r['setup']:<42} {r['published_gib']:9.1f} "
              f"{r['estimate_gib']:9.1f} {r['estimate_gib'] / r['published_gib']:6.2f} "
              f"{r['adjusted_gib']:9.1f}")
    print("  (trainable counts of the peft runs match exactly: 9,175,040 / 9,289,728 / 3,212,749,824)")
    return rows


# ----------------------------------------------------------------------------- GPU
GPU_MODELS = {
    "llama-0.1B": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12,
                       "num_attention_heads": 12, "num_key_value_heads": 4, "vocab_size": 32000},
    "llama-0.5B": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 24,
                       "num_attention_heads": 16, "num_key_value_heads": 8, "vocab_size": 32000},
    "llama-1.1B": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                       "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000},
    "llama-1.2B-128k": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
                            "vocab_size": 128256, "tie_word_embeddings": True},
}


def gpu_step(folder, quant, dtype, spec, batch, seq, ckpt, device="cuda") -> tuple[float, float]:
    """Peak allocated / reserved bytes of the 3rd training step (fused AdamW, autocast).
    With ``device="cpu"`` (``--gpu-dry-run``) the same code runs and returns NaNs."""
    model, _ = ll.load_model(folder, quant=quant, device=device, dtype=dtype)
    model = ll.attach(model, spec, gradient_checkpointing=ckpt)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)
    autocast = torch.bfloat16 if dtype == "bfloat16" else torch.float16
    cuda = device.startswith("cuda")
    for _ in range(3):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with torch.autocast(device.split(":")[0], dtype=autocast):
            loss = model(input_ids=ids, labels=ids).loss     # no mask: unpadded batches
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del loss
    out = ((torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()) if cuda
           else (float("nan"), float("nan")))
    del model, opt, params
    if cuda:
        torch.cuda.empty_cache()
    return out


def gpu_runs(quick: bool, device: str = "cuda") -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_lab.hf.model.builtin import TOKENIZER_DIR

    dry = not device.startswith("cuda")
    print(f"== GPU: {'DRY RUN on CPU (code path only)' if dry else torch.cuda.get_device_name()}"
          " — measured vs estimated peak ==")
    rows, tok = [], AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    spec = ll.AdapterSpec(r=16, target_modules="all-linear")
    models = list(GPU_MODELS.items())[: 2 if quick else None]
    dtypes, shapes = ("bfloat16", "float16"), ((False, 4, 512), (True, 4, 1024))
    if dry:
        models, dtypes, shapes = [("tiny", TINY)], ("bfloat16",), ((False, 2, 32), (True, 2, 64))
    with tempfile.TemporaryDirectory() as tmp:
        for name, kw in models:
            cfg = LlamaConfig(**kw)
            folder = os.path.join(tmp, name)
            AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(folder)
            tok.save_pretrained(folder)
            for dtype in dtypes:
                for quant in (None, ll.QuantSpec(compute_dtype=dtype)):
                    for ckpt, batch, seq in shapes:
                        alloc, reserved = gpu_step(folder, quant, dtype, spec, batch, seq, ckpt,
                                                   device)
                        est = estimate_memory(cfg, spec, quant=quant, batch_size=batch, seq_len=seq,
                                              gradient_checkpointing=ckpt, device=80, padded=False)
                        row = {"model": name, "dtype": dtype, "method": est.chosen, "ckpt": ckpt,
                                   "batch": batch, "seq": seq, "measured_alloc": alloc,
                                   "measured_reserved": reserved, "est_alloc": est.peak_allocated(),
                                   "est_reserved": est.peak_reserved(),
                                   "terms": {k: v for k, v in est.breakdown.items()}}
                        row["err_alloc"] = row["est_alloc"] / alloc - 1
                        row["err_reserved"] = row["est_reserved"] / reserved - 1
                        rows.append(row)
                        print(f"  {name:<16} {dtype:<9} {est.chosen:<6} ckpt={ckpt!s:<5} "
                              f"{batch}x{seq}: alloc {alloc / GIB:6.2f} est {row['est_alloc'] / GIB:6.2f}"
                              f" ({row['err_alloc']:+.1%})  reserved {reserved / GIB:6.2f} est "
                              f"{row['est_reserved'] / GIB:6.2f} ({row['err_reserved']:+.1%})",
                              flush=True)
    within = sum(abs(r["err_alloc"]) <= 0.15 for r in rows)
    print(f"  within ±15% (allocated): {within}/{len(rows)}")
    if os.environ.get("OUT") and not dry:
        with open(os.path.join(os.environ["OUT"], "memory_gpu.json"), "w") as fh:
            json.dump(rows, fh, indent=1)
    return rows


# ----------------------------------------------------------------------------- RSS
def rss_check() -> None:
    print("== Peak RSS of planning hub-sized configs (fresh process each) ==")
    # VmHWM (peak RSS of this process image); ru_maxrss would carry the parent's peak over exec.
    hwm = "int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) / 1024"
    code = ("import lora_lab as ll; from transformers import LlamaConfig; "
            "from lora_lab.hf.model.plan import estimate_memory; import benchmarks.memory_accuracy as m; "
            "e = estimate_memory(LlamaConfig(**m.{0}), ll.AdapterSpec(), quant='nf4'); "
            f"print({hwm}, e.total_params)")
    base = ("import lora_lab, transformers, pandas, lora_lab.hf.model.plan, benchmarks.memory_accuracy; "
            f"print({hwm}, 0)")
    for label, src in (("imports only", base), ("8B", code.format("LLAMA31_8B")),
                       ("70B", code.format("LLAMA_70B"))):
        out = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, check=False,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        rss, n = out.stdout.split()[-2:] if out.returncode == 0 else ("nan", "0")
        print(f"  {label:<13} peak RSS {float(rss):7.1f} MB  params {int(n):,}"
              + ("" if out.returncode == 0 else f"  FAILED: {out.stderr[-300:]}"))


_RSS_STEP = """
import sys, warnings
warnings.filterwarnings("ignore")
import torch, lora_lab as ll
from lora_lab.hf.model.plan import estimate_memory
folder, mode, padded = sys.argv[1], sys.argv[2], sys.argv[3] == "padded"
model, _ = ll.load_model(folder, device="cpu")
spec = ll.AdapterSpec(r=8) if mode == "lora" else None          # None: full fine-tuning
if spec is not None:
    model = ll.attach(model, spec)
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
torch.manual_seed(0)
ids = torch.randint(0, model.config.vocab_size, (8, 64))
mask = torch.ones_like(ids)
if padded:
    mask[::2, 32:] = 0                                             # half the rows half padding
for _ in range(3):
    loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    del loss
    opt.step()
    opt.zero_grad(set_to_none=True)
hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM")][0].split()[1]
est = estimate_memory(folder, spec, batch_size=8, seq_len=64, device="cpu", padded=padded)
print(int(hwm) * 1024, est.need())
"""


def cpu_rss(folder: str) -> list[dict]:
    """Peak RSS of 3 CPU training steps (fresh processes) against the CPU estimate."""
    print(f"== CPU: peak RSS of training {folder} (batch 8 x 64, 3 steps) vs estimate ==")
    rows = []
    for mode in ("lora", "full"):
        for padded in ("unpadded", "padded"):
            out = subprocess.run([sys.executable, "-c", _RSS_STEP, folder, mode, padded],
                                 capture_output=True, text=True, check=False)
            if out.returncode:
                print(f"  {mode} {padded}: FAILED {out.stderr[-300:]}")
                continue
            hwm, need = map(float, out.stdout.split()[-2:])
            rows.append({"mode": mode, "padded": padded, "rss": hwm, "need": need})
            print(f"  {mode:<5} {padded:<9} peak RSS {hwm / GIB:6.3f} GiB ({hwm / 1e9:.2f} GB), "
                  f"estimate {need / GIB:6.3f} GiB, ratio {need / hwm:.3f}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpu", action="store_true", help="measure real training steps on CUDA")
    ap.add_argument("--quick", action="store_true",
                    help="CPU: builtin model only, 2 activation cases; GPU: the two smallest models only")
    ap.add_argument("--gpu-dry-run", action="store_true",
                    help="run the --gpu code path on CPU with a tiny model (no measurement)")
    ap.add_argument("--rss", action="store_true", help="peak RSS of planning 8B/70B configs")
    ap.add_argument("--cpu-rss", metavar="FOLDER",
                    help="peak RSS of LoRA and full-FT training on the CPU vs the estimate")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import _report  # here: rss_check imports this file as benchmarks.memory_accuracy

    exact, cases = cpu_parameter_and_optimizer_terms(args.quick)
    act = cpu_activation_term(args.quick)
    refs = published_references()
    ratios = {"exact_byte_cases": exact / cases, "activation_est/kept min": min(act),
              "activation_est/kept max": max(act)}
    tt = [r["estimate_gib"] / r["published_gib"] for r in refs if r["source"] == "torchtune README"]
    pf = [r["estimate_gib"] / r["published_gib"] for r in refs if r["source"] == "peft MetaMathQA"]
    ratios.update({"torchtune est/published min": min(tt), "torchtune est/published max": max(tt),
                   "peft est/published min": min(pf), "peft est/published max": max(pf)})
    targets = {"exact_byte_cases": ">= 1"}
    extra: dict = {"cases": cases}
    if args.cpu_rss:
        rows = cpu_rss(args.cpu_rss)
        if rows:
            ratios["cpu_rss est/measured min"] = min(r["need"] / r["rss"] for r in rows)
            ratios["cpu_rss est/measured max"] = max(r["need"] / r["rss"] for r in rows)
    if args.rss:
        rss_check()
    if args.gpu_dry_run:
        gpu_runs(quick=True, device="cpu")
    if args.gpu:
        if not torch.cuda.is_available():
            sys.exit("--gpu needs a CUDA GPU")
        rows = gpu_runs(args.quick)
        errs = [abs(r["err_alloc"]) for r in rows]
        ratios["gpu within 15% (allocated)"] = sum(e <= 0.15 for e in errs) / len(errs)
        targets["gpu within 15% (allocated)"] = ">= 1"
        extra["gpu_max_abs_err_alloc"] = max(errs)
    _report.report("memory_accuracy", ratios, targets, quick=args.quick, extra=extra)


if __name__ == "__main__":
    main()
