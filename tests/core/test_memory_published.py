"""The memory planner against peak memory that others measured on real GPUs (issue 18).

Nobody here ran these: each number is copied from its source, cited with its setup, and each check
states its band and why.  Published runs use the Hugging Face loss (full fp32 logits), so every
estimate passes ``chunked_loss=False``.  The published models are planned from their configs
(meta device: no weights); the gaps of peft's setup are measured on the CPU on a small Llama
(``test_the_gaps_of_peft_s_setup_measured_on_cpu``, a few seconds).

**peft's method comparison** (github.com/huggingface/peft, ``method_comparison/MetaMathQA``:
``run.py`` and ``results/*.json``).  Llama-3.2-3B in bf16 on an NVIDIA L40S, no autocast
(``use_amp: false``; peft keeps the adapters in fp32), torch AdamW, batch 4, ``max_seq_length``
768, no gradient checkpointing, MetaMathQA rows bucketed by length and padded per batch (20,000
rows, 4,198,051 tokens: 210 per row on average).  ``run.py`` logs after every optimizer step
``memory_allocated()`` and ``memory_reserved()``, and empties the cache every 10 steps:

* ``accelerator_memory_reserved_99th`` (older files: ``cuda_memory_reserved_99th``): the 99th
  percentile of reserved-after-step, i.e. the peak of the longest training batches.  **This is
  what the planner models: one training step.**
* ``accelerator_memory_max`` (``cuda_memory_max``): max reserved over the whole run, including the
  evaluation by ``generate`` with batch 50 and up to 800 tokens (a KV cache the planner does not
  model).  That the estimate sits near this number is a coincidence of two errors (longer rows
  than the data has, no generation); it is shown in the README, not asserted.
* ``mem allocated avg``: allocated after the step, averaged over 250 steps.  ``run.py`` calls
  ``optimizer.zero_grad()`` at the *start* of a step, so the gradients are still held.
"""

import pytest
from test_memory import ACT_CFG, kept_for_backward  # tests/core is on sys.path (rootdir mode)
from transformers import LlamaConfig

import lora_lab as ll
from lora_lab.core.memory import GIB
from lora_lab.hf.model.plan import FULL_FT, estimate_memory

LLAMA32_3B = dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                  num_attention_heads=24, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                  tie_word_embeddings=True)
QV = ll.AdapterSpec(r=32, alpha=64, target_modules=("q_proj", "v_proj"))
# method: (spec, trainable params, reserved 99th pct, reserved max, mem allocated avg) as published.
# Files under huggingface/peft method_comparison/MetaMathQA/results/, at the commit read:
PEFT = {
    # lora--llama-3.2-3B-rank32.json @0a179c1e8659ab4f7df0369b9b03943cfe470ff1 (allocated avg:
    # 6.914e9 to 6.932e9 over the 20 windows of 250 steps)
    "LoRA": (QV, 9_175_040, 17_710_763_212, 22_273_851_392, 6.922e9),
    # lora--llama-3.2-3B-rank32-dora.json @52903c83d95bb68cf7f3217b9b6cd528799b24fc
    "DoRA": (QV.replace(use_dora=True), 9_289_728, 22_171_090_944, 24_540_872_704, 6.922e9),
    # ia3--llama-3.2-3B-default.json @1948110ce61086030772abf36aa9396c5c3e6739 (k, v, down_proj)
    "IA3": (ll.AdapterSpec(method="ia3", target_modules=("k_proj", "v_proj", "down_proj")),
            286_720, 18_398_566_154, 23_137_878_016, 6.778e9),
    # prefixtuning--llama-3.2-3B-lr_0.001.json @1948110ce61086030772abf36aa9396c5c3e6739
    "prefix": (ll.AdapterSpec(method="prefix", num_virtual_tokens=200), 11_468_800,
               16_945_051_074, 20_912_799_744, 7.051e9),
    # full-finetuning--llama-3.2-3B-lr_0.00001.json (as in tests/core/test_memory_fullft.py)
    FULL_FT: (None, 3_212_749_824, 33_573_390_254, 37_241_225_216, 26.065e9),
}


def _peft_estimate(method: str, seq_len: int = 768):
    spec = PEFT[method][0]
    est = estimate_memory(LlamaConfig(**LLAMA32_3B), spec, batch_size=4, seq_len=seq_len,
                          gradient_checkpointing=False, device=48, chunked_loss=False)
    return est, (FULL_FT if spec is None else est.chosen)


@pytest.mark.parametrize("method", list(PEFT))
def test_peft_runs_trainable_counts_are_exact(method):
    """peft's ``num_trainable_params`` of each run, counted on the config alone."""
    est, scen = _peft_estimate(method)
    assert scen == method and est.trainable[scen] == PEFT[method][1]


@pytest.mark.parametrize("method", list(PEFT))
def test_peft_weights_gradients_and_adamw_are_what_stays_allocated_after_a_step(method):
    """base + adapter + gradients + AdamW moments against ``mem allocated avg`` (gradients held):
    93-100% (full FT: 98.6%).  The rest, 0.35-0.44 GB in every run, is what the loop still holds
    after the step and the planner does not count, most likely ``outputs``, alive until the next
    step: its bf16 logits are 4·s·V·2 bytes, 1 MB per token of padded row length."""
    est, scen = _peft_estimate(method)
    t = est.scenarios[scen]
    static = t["base_weights"] + t["adapter_weights"] + t["gradients_total"] + t["optimizer_states"]
    ratio = static / PEFT[method][4]
    assert 0.93 <= ratio <= 1.0, ratio
    assert 0.30e9 <= PEFT[method][4] - static <= 0.45e9


def _implied_seq_len(method: str, extra_per_token: float = 0.0) -> float:
    """The padded row length at which the estimate equals the published 99th percentile.  The
    estimate is linear in the sequence length here (SDPA: no s² scores; the b·s² mask is 2 MB),
    so two estimates give the line.  ``extra_per_token``: reserved bytes per token to add."""
    r = {}
    for s in (384, 768):
        est, scen = _peft_estimate(method, s)
        r[s] = est.peak_reserved(scen) + extra_per_token * 4 * s
    slope = (r[768] - r[384]) / 384
    return (PEFT[method][2] - (r[768] - slope * 768)) / slope


def lora_fp32_input_extra(modules, dora: bool = False) -> int:
    """Bytes per token that peft's adapters keep *without* autocast (a bf16 base, fp32 adapters,
    as in peft's runs) beyond the planner's autocast model, summed over ``(in, out, r)`` modules:
    peft casts the adapter input to the adapter's fp32, so ``x`` and ``A·x`` are kept in 4 bytes
    instead of 2: ``2·(in + r)``; DoRA's LoRA output is fp32 too: ``+ 2·out`` (measured below)."""
    return sum(2 * (i + r) + (2 * o if dora else 0) for i, o, r in modules)


def _act_modules(cfg: dict):
    """``{name: (in, out)}`` of one layer's linear modules of a Llama config."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * cfg.get("head_dim", h // cfg["num_attention_heads"])
    return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


@pytest.mark.parametrize("kind", ["lora", "dora", "ia3"])
def test_the_gaps_of_peft_s_setup_measured_on_cpu(kind):
    """What the corrections below are made of, measured: bytes autograd keeps after a forward
    without autocast (bf16 base, fp32 adapters: peft's loop) on the CPU, against the estimate plus
    the correction, within ±3% (measured: LoRA 21.39 MB, DoRA 36.25, DoRA's estimate + correction
    36.34).  IA3 keeps the same bytes with or without autocast, and the planner models them: 15.60
    estimated, 15.41 measured."""
    import torch
    from transformers import AutoModelForCausalLM

    spec = {"lora": ll.AdapterSpec(r=8), "dora": ll.AdapterSpec(r=8, use_dora=True),
            "ia3": ll.AdapterSpec(method="ia3")}[kind]
    cfg, batch, seq = LlamaConfig(**ACT_CFG), 2, 128
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(torch.bfloat16)
    model = ll.attach(base, spec, gradient_checkpointing=False).train()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    measured = kept_for_backward(model, ids, autocast=False)
    est = estimate_memory(cfg, spec, batch_size=batch, seq_len=seq, gradient_checkpointing=False,
                          padded=False, device="A100-80GB", chunked_loss=False)
    modelled = est.breakdown["activations"] + batch * seq * cfg.vocab_size * 4
    mods = _act_modules(ACT_CFG)
    if kind == "ia3":   # the planner models IA3's kept tensors itself (the same bytes with autocast)
        assert modelled == pytest.approx(measured, rel=0.03)
        return
    per_layer = lora_fp32_input_extra([(i, o, 8) for i, o in mods.values()], kind == "dora")
    corrected = modelled + batch * seq * ACT_CFG["num_hidden_layers"] * per_layer
    assert modelled < 0.85 * measured                        # the gap is real
    assert corrected == pytest.approx(measured, rel=0.03)


# The same corrections for peft's runs (Llama-3.2-3B: LoRA/DoRA on q, v at r=32; IA3 on k, v and
# down_proj), in bytes per token and layer; the allocator adds its 10% on top.
_QV = [(3072, 3072, 32), (3072, 1024, 32)]
PEFT_EXTRA = {"LoRA": lora_fp32_input_extra(_QV), "DoRA": lora_fp32_input_extra(_QV, dora=True),
              "IA3": 0,   # IA3's kept tensors are in the planner's activation term
              "prefix": 0, FULL_FT: 0}


@pytest.mark.parametrize("method", list(PEFT))
def test_peft_training_step_peak_is_the_estimate_at_the_data_s_row_length(method):
    """The training-step peak (reserved, 99th percentile).  At the 768-token limit the estimate is
    7-33% above it (LoRA 20.7 GiB estimated vs 16.5 measured, DoRA 22.2 vs 20.6, IA3 22.8 vs 17.1,
    prefix 19.7 vs 15.8, full FT 35.7 vs 31.3): the planner pads every batch to ``seq_len``, and
    MetaMathQA's rows are shorter (210 tokens on average; the longest batches set the
    percentile).  The check that can fail: one padded row length explains all five runs.  Solving
    estimate (+ the measured gap of peft's no-autocast setup for LoRA and DoRA, above) == measured for the row
    length gives 508 (LoRA), 625 (DoRA), 510 (IA3), 548 (prefix) and 578 (full FT) tokens; a term
    off by 25% moves its run out of [490, 650].  Without the correction LoRA reads 546, and IA3
    without the planner's IA3 term 632.  DoRA sits highest: each step peft builds the full
    ``out × in`` matrix W + s·BA of every DoRA module for its weight norm (transient, not kept,
    and not in the estimate)."""
    est, scen = _peft_estimate(method)
    ratio = est.peak_reserved(scen) / PEFT[method][2]
    assert 1.05 <= ratio <= 1.35, ratio
    extra = LLAMA32_3B["num_hidden_layers"] * PEFT_EXTRA[method] * 1.10
    assert 490 <= _implied_seq_len(method, extra) <= 650


def test_peft_ia3_run_needs_the_ia3_activation_term():
    """IA3 was the run the planner under-counted most: the kept IA3 tensors (2·(2·1024) + 4·8192 =
    36.9 kB per token and layer in bf16, +37% of the frozen layer's 98 kB; measured on the CPU
    above) were not in its activation term.  Without them the implied row length is 632, the
    highest of the five; with them (the planner now) 510, with LoRA's 508."""
    ia3_bytes = 2 * (2 * 1024) + 4 * 8192                  # k, v outputs (bf16); down_proj's fp32 input
    without = _implied_seq_len("IA3", -LLAMA32_3B["num_hidden_layers"] * ia3_bytes * 1.10)
    with_ia3 = _implied_seq_len("IA3")
    lora = _implied_seq_len("LoRA", LLAMA32_3B["num_hidden_layers"] * PEFT_EXTRA["LoRA"] * 1.10)
    assert without > 620 and without > lora + 80
    assert abs(with_ia3 - lora) < 25


# Unsloth's long-context table (unsloth.ai/blog/llama3-3, "Llama 3.3 (70B) max. context length"):
# 4-bit QLoRA on all linear layers (q, k, v, o, gate, up, down), rank 32, batch 1, rows padded to
# the length, an A100 80GB.  Hugging Face + FA2: 6,916 tokens on 80 GB, out of memory on 48 GB.
# The same post: Llama 3.1 (8B) with HF + FA2 "can only do 28,000 on a 80GB GPU" and goes out of
# memory on 8 GB.  Those lengths need gradient checkpointing (without it the estimate is ~5x the
# card at 6,916 tokens), as HF's QLoRA recipe turns on.
LLAMA_70B = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                 num_attention_heads=64, num_key_value_heads=8, vocab_size=128256)
LLAMA31_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)
UNSLOTH_SPEC = ll.AdapterSpec(r=32, alpha=32, target_modules="all-linear")


def _max_context(arch: dict, gib: float, checkpointing: bool = True) -> float:
    """Longest row (batch 1) whose estimated device need (reserved peak + CUDA context) fits in
    ``gib`` GiB: the need is linear in the length, so two estimates give it."""
    need = {}
    for s in (1024, 2048):
        e = estimate_memory(LlamaConfig(**arch), UNSLOTH_SPEC, quant="nf4", batch_size=1, seq_len=s,
                            gradient_checkpointing=checkpointing, device=gib, padded=False,
                            chunked_loss=False)
        need[s] = e.need("QLoRA")
    slope = (need[2048] - need[1024]) / 1024
    return 1024 + (gib * GIB - need[1024]) / slope


def test_unsloth_long_context_qlora_70b_on_80_and_48_gb():
    """Llama 3.3 70B QLoRA: the estimated longest row on 80 GiB is within ±10% of the 6,916 tokens
    HF + FA2 reached (the band: the published length is the last one that ran, at a step we do
    not know, and the remainder cast to fp32 by peft is the planner's assumption for HF's
    recipe); on 48 GB the base alone leaves room for under 512 tokens: "OOM"."""
    assert _max_context(LLAMA_70B, 80) == pytest.approx(6916, rel=0.10)
    assert _max_context(LLAMA_70B, 48) < 512
    assert _max_context(LLAMA_70B, 80, checkpointing=False) < 6916 / 4


def test_unsloth_long_context_qlora_8b_on_80_and_8_gb():
    """Llama 3.1 8B QLoRA: the estimated longest row on 80 GiB is within ±10% of HF + FA2's
    28,000 (same band and reasons); on 8 GB even one token does not fit (the 4-bit base, the
    fp32 embeddings and LM head of the prepared base, and AdamW: 9.0 GiB)."""
    assert _max_context(LLAMA31_8B, 80) == pytest.approx(28_000, rel=0.10)
    e = estimate_memory(LlamaConfig(**LLAMA31_8B), UNSLOTH_SPEC, quant="nf4", batch_size=1,
                        seq_len=1, device=8, padded=False, chunked_loss=False)
    assert e.need("QLoRA") > 8 * GIB
