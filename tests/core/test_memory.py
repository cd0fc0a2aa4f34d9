"""The memory model, term by term, against hand computations for a small config."""

import pytest

from lora_lab.core import memory as mem

ARCH = mem.Architecture(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, head_dim=16,
                        vocab=100)
# two adapted modules per layer: 64 -> 64 and 64 -> 32, rank 4
LORA = mem.TrainableLayout(params=2 * 4 * ((64 + 64) + (64 + 32)), param_bytes=4,
                           modules=((64, 64, 4), (64, 32, 4)) * 2)


def test_four_bit_storage_per_tensor():
    # 8192 weights: 4096 bytes of codes, 128 blocks of 64
    assert mem.four_bit_bytes(8192) == (4096, 128 * 4)                      # fp32 absmax
    assert mem.four_bit_bytes(8192, double_quant=True) == (4096, 128 + 4)    # uint8 + 1 fp32
    assert mem.four_bit_bytes(100) == (50, 2 * 4)                            # ceil(100/64) = 2
    assert mem.four_bit_bytes(100, double_quant=True) == (50, 2 + 4)


def test_qlora_paper_bits_per_parameter():
    n = 64 * 256 * 1000
    packed, consts = mem.four_bit_bytes(n)
    assert 8 * packed / n == 4.0 and 8 * consts / n == pytest.approx(0.5)   # 32/64
    _, dq = mem.four_bit_bytes(n, double_quant=True)
    assert 8 * dq / n == pytest.approx(8 / 64 + 32 / (64 * 256))          # 0.127 bit (QLoRA §3)
    assert 8 * dq / n == pytest.approx(0.127, abs=1e-3)


def test_int8_storage_and_layout_sum():
    assert mem.int8_bytes(32, 64) == (2048, 128)
    q = mem.QuantLayout(bits=4, shapes=((64, 128), (32, 64)), double_quant=False)
    assert q.storage() == (4096 + 1024, 4 * (128 + 32)) and q.numel == 8192 + 2048
    q8 = mem.QuantLayout(bits=8, shapes=((64, 128),))
    assert q8.storage() == (8192, 256)


def test_optimizer_bytes():
    assert mem.optimizer_bytes_per_param("adamw", 4) == 8
    assert mem.optimizer_bytes_per_param("paged_adamw", 2) == 4
    assert mem.optimizer_bytes_per_param("adamw_8bit", 4) == pytest.approx(2 * (1 + 4 / 256))
    assert mem.optimizer_bytes_per_param("sgd", 4) == 0
    with pytest.raises(ValueError):
        mem.optimizer_bytes_per_param("lion", 4)


def test_layer_activations_by_hand():
    # norms 2*4*64 = 512; attention 2*(2*64 + 2*32) = 384; SwiGLU 3*2*128 = 768
    assert mem.layer_activation_bytes(ARCH, 2, full=False) == 1664
    # full FT keeps the linear inputs too: 2*(5*64 + 128) = 896
    assert mem.layer_activation_bytes(ARCH, 2, full=True) == 1664 + 896
    # a padding mask makes transformers repeat the KV heads: k, v kept at h = 64, not 32
    assert mem.layer_activation_bytes(ARCH, 2, full=False, padded=True) == 1664 + 2 * 2 * 32
    # prepared k-bit base: fp32 residual stream, so SwiGLU keeps fp32: 3*4*128 = 1536
    assert mem.layer_activation_bytes(ARCH, 2, full=False, fp32_stream=True) == 512 + 384 + 1536


def test_activations_with_and_without_checkpointing_by_hand():
    # per layer: 1664 + adapters (4 modules * 2*(64+4) = 544 over 2 layers -> 272) = 1936
    T = 2 * 8
    shared = T * 4 * 64                                    # final norm
    kept, one = mem.activation_bytes(ARCH, LORA, batch=2, seq=8, checkpointing=False, c=2)
    assert one == T * 1936 and kept == T * 2 * 1936 + shared
    kept_ck, one_ck = mem.activation_bytes(ARCH, LORA, batch=2, seq=8, checkpointing=True, c=2)
    assert one_ck == one and kept_ck == T * 2 * 2 * 64 + T * 1936 + shared
    kept_p, _ = mem.activation_bytes(ARCH, LORA, batch=2, seq=8, checkpointing=False, c=2,
                                     padded=True)          # + repeated KV, + bool mask b*s*s
    assert kept_p == T * 2 * (1936 + 128) + shared + 2 * 8 * 8
    kept_q, _ = mem.activation_bytes(ARCH, LORA, batch=2, seq=8, checkpointing=True, c=2,
                                     fp32_stream=True)     # fp32 layer inputs are kept
    assert kept_q == T * 2 * 4 * 64 + T * (1936 + 3 * 2 * 128) + shared
    drop = mem.TrainableLayout(params=LORA.params, modules=LORA.modules, dropout=True)
    kept_d, _ = mem.activation_bytes(ARCH, drop, batch=2, seq=8, checkpointing=False, c=2)
    assert kept_d - kept == T * 2 * (4 * 3 * 64 / 2)       # (1 + c)*in per module


def test_logits_term():
    assert mem.logits_bytes(ARCH, batch=2, seq=8, c=2) == 16 * 100 * 12   # backward: 3 fp32
    assert mem.logits_bytes(ARCH, batch=2, seq=8, c=4) == 16 * 100 * 12
    assert mem.logits_bytes(ARCH, batch=1, seq=1, c=8) == 100 * 16          # forward: c + 8


def test_memory_terms_lora_by_hand():
    t = mem.memory_terms(arch=ARCH, total_params=10_000, unquantized_params=2_000, trainable=LORA,
                         batch=2, seq=8, checkpointing=False, compute_bytes=2, cuda_context=100,
                         fragmentation=0.1)
    assert t["base_weights"] == 20_000
    assert t["adapter_weights"] == LORA.params * 4
    assert t["optimizer_states"] == LORA.params * 8
    kept, _ = mem.activation_bytes(ARCH, LORA, 2, 8, False, 2, padded=True)  # batch > 1
    assert t["activations"] == kept and t["logits"] == 19_200 and t["gradients"] == 0
    assert t["allocator_overhead"] == pytest.approx(0.1 * (kept + 19_200))
    assert t["cuda_context"] == 100
    assert t["merge_peak"] == 20_000 + LORA.params * 4 + 64 * 128 * 2


def test_memory_terms_qlora_and_full():
    q = mem.QuantLayout(bits=4, shapes=((64, 128),) * 4, double_quant=True)
    t = mem.memory_terms(arch=ARCH, total_params=4 * 8192 + 2000, unquantized_params=2000,
                         trainable=LORA, quant=q, batch=1, seq=4, compute_bytes=2)
    assert t["base_weights"] == 4 * 4096 + 2000 * 4         # packed + fp32 rest (peft cast)
    assert t["quant_constants"] == 4 * (128 + 4)
    assert t["merge_peak"] == 2000 * 4 + 4 * 8192 * 2 + LORA.params * 4 + 8192 * 2
    kept, _ = mem.activation_bytes(ARCH, LORA, 1, 4, True, 2, fp32_stream=True)
    assert t["activations"] == kept + 8192 * 2             # + one dequantized weight
    full = mem.TrainableLayout(params=10_000, param_bytes=2, full=True)
    f = mem.memory_terms(arch=ARCH, total_params=10_000, unquantized_params=0, trainable=full,
                         batch=1, seq=1, compute_bytes=2)
    assert f["adapter_weights"] == 0 and f["optimizer_states"] == 40_000
    # grads (20 kB) outweigh 1 token of activations: the peak is at the end of backward
    assert f["gradients"] == 20_000 and f["logits"] == 0


def test_devices_and_verdict():
    assert mem.device_bytes("T4") == ("T4", 16 * mem.GIB)
    assert mem.device_bytes("a100-80gb")[0] == "A100-80GB"
    assert mem.device_bytes(24) == ("24 GiB", 24 * mem.GIB)
    for bad in ("TPU", "A100", 0, -3):                   # "A100" alone is 40 or 80 GB
        with pytest.raises(ValueError):
            mem.device_bytes(bad)
    assert mem.verdict(8, 10) == "fits" and mem.verdict(9.5, 10) == "tight"
    assert mem.verdict(10.5, 10) == "does not fit"


def test_quant_storage_by_hand():
    # a 64×64 NF4 weight at 4.5 bits (32/64 for the fp32 absmax) and 128 int8 weights at 8.25
    s = mem.quant_storage([64 * 64, 128], [4.5, 8.25])
    assert s.numel == 4224 and s.fp16_bytes == 2 * 4224
    assert s.quant_bytes == (4096 * 4.5 + 128 * 8.25) / 8
    assert s.saved_bytes == s.fp16_bytes - s.quant_bytes
    assert s.saved_share == pytest.approx(1 - s.quant_bytes / s.fp16_bytes)
    assert s.bits_per_param == pytest.approx((4096 * 4.5 + 128 * 8.25) / 4224)
    assert s["saved_bytes"] == s.saved_bytes                   # the old dict's keys still read
    with pytest.raises(KeyError):
        s["nonsense"]
    empty = mem.quant_storage([], [])
    assert (empty.fp16_bytes, empty.saved_share, empty.bits_per_param) == (0.0, 0.0, 0.0)


# ----------------------------------------------------------------------------- against autograd
def kept_for_backward(model, ids, mask=None, autocast=True) -> int:
    """Bytes autograd keeps for the backward pass after one forward and loss: every tensor saved
    through ``torch.autograd.graph.saved_tensors_hooks`` that is still alive when the forward
    ends, deduplicated by storage (DoRA builds and frees a graph for its weight norm on the way),
    weights and buffers excluded."""
    import weakref

    import torch

    saved: list = []

    def pack(t):
        saved.append(weakref.ref(t))
        return t

    ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    fixed = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    # Deduplicated by storage among the tensors still alive: a freed tensor's address may be
    # reused by a later one, so addresses are read only now, when no two live storages share one.
    alive = {st.data_ptr(): st.nbytes() for st in (r().untyped_storage() for r in saved
                                                   if r() is not None)}
    kept = sum(n for ptr, n in alive.items() if ptr not in fixed)
    del loss
    return kept


ACT_CFG = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
               num_key_value_heads=4, vocab_size=4000)


@pytest.mark.parametrize("spec_kw, batch, seq, padded", [
    (dict(r=8), 2, 128, False),                                           # all linear layers
    (dict(r=16, target_modules="attention-qv"), 4, 256, False),          # another shape and r
    (dict(r=8), 4, 128, True),                                            # padding: mask, repeated KV
    (dict(r=8, use_dora=True), 4, 256, False),                            # DoRA: + 2c·out
    (dict(method="ia3"), 2, 128, False),                                  # IA3: + 4·in or c·out
])
def test_activation_term_is_what_autograd_keeps_within_3_percent(spec_kw, batch, seq, padded):
    """The estimate's activations plus the loss's kept fp32 log-probs (``T·V·4``) against the
    bytes autograd really keeps after a bf16-autocast forward (SDPA, no checkpointing) of a
    config-built Llama with peft adapters: within ±3% (measured 0.99-1.01).  Every term matters at
    this size: the norms are 17% of a LoRA layer, the adapters 37%, DoRA's two outputs 44% of a
    DoRA layer (the old ``(c + 8)·out`` DoRA term gave 1.55 here), the log-probs 24% of the total;
    IA3 without its kept tensors gave 0.795 (now 1.012)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    import lora_lab as ll
    from lora_lab.hf.model.plan import estimate_memory

    cfg = LlamaConfig(**ACT_CFG)
    spec = ll.AdapterSpec(**spec_kw)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(torch.bfloat16)
    model = ll.attach(base, spec, gradient_checkpointing=False).train()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    mask = None
    if padded:                                       # right padding on every other row
        mask = torch.ones_like(ids)
        mask[::2, seq // 2:] = 0
    measured = kept_for_backward(model, ids, mask)
    est = estimate_memory(cfg, spec, batch_size=batch, seq_len=seq, gradient_checkpointing=False,
                          padded=padded, device="A100-80GB", chunked_loss=False)
    modelled = est.breakdown["activations"] + batch * seq * cfg.vocab_size * 4
    assert modelled == pytest.approx(measured, rel=0.03)
