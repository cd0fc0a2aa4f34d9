"""estimate_memory: exact counts against real peft models, 4-bit storage against bitsandbytes,
terms against the formulas, and clear errors."""

import pytest
import torch

import lora_lab as ll
from lora_lab.core import memory as mem
from lora_lab.errors import ModelLoadError, SpecError, TargetModuleError
from lora_lab.hf.model.facts import model_facts
from lora_lab.hf.model.plan import estimate_memory

SPEC_LIST = [
    ll.AdapterSpec(r=4),                                                     # all linear
    ll.AdapterSpec(r=8, target_modules=("q_proj", "v_proj"), layers=(1,)),   # LoRA paper, 1 layer
    ll.AdapterSpec(r=2, target_modules="attention", use_dora=True),          # + magnitudes
    ll.AdapterSpec(r=16, alpha=8, target_modules="mlp", use_rslora=True),
    ll.AdapterSpec(method="ia3"),                                            # peft's defaults
    ll.AdapterSpec(method="ia3", target_modules=("k_proj", "down_proj")),
    ll.AdapterSpec(method="prompt", num_virtual_tokens=5),
    ll.AdapterSpec(method="prefix", num_virtual_tokens=3),                   # GQA: kv_dim
]


@pytest.mark.parametrize("spec", SPEC_LIST, ids=lambda s: f"{s.method}-{s.target_modules}-{s.r}")
def test_counts_equal_the_real_peft_model(tiny_llama_dir, spec):
    est = estimate_memory(tiny_llama_dir, spec)          # a local folder: only its config is read
    model, _ = ll.load_model(tiny_llama_dir, device="cpu")
    peft_model = ll.attach(model, spec)
    real = ll.count_parameters(peft_model)
    assert est.trainable[est.chosen] == real.trainable
    assert est.total_params + real.trainable == real.total
    assert est.adapter_file_bytes == real.adapter_bytes   # fp32 adapter tensors


def test_config_model_and_folder_agree(tiny_llama, tiny_llama_dir):
    model, _ = tiny_llama
    spec = ll.AdapterSpec(r=4, target_modules=("q_proj", "o_proj"))
    a = estimate_memory(model, spec, batch_size=2, seq_len=64)
    b = estimate_memory(model.config, spec, batch_size=2, seq_len=64)
    c = estimate_memory(str(tiny_llama_dir), spec, batch_size=2, seq_len=64)
    assert a.breakdown == b.breakdown == c.breakdown
    assert a.total_params == sum(p.numel() for p in model.parameters())


def test_a_loaded_model_brings_its_adapter_and_quantization(tiny_llama_nf4):
    model, _ = tiny_llama_nf4
    spec = ll.AdapterSpec(r=4, target_modules=("q_proj", "v_proj"))
    peft_model = ll.attach(model, spec)
    est = estimate_memory(peft_model)
    assert est.spec == spec and est.quant == ll.QuantSpec() and est.chosen == "QLoRA"
    assert est.trainable["QLoRA"] == ll.count_parameters(peft_model).trainable


def test_four_bit_storage_matches_bitsandbytes(tiny_llama_nf4, tiny_llama_dir):
    model, _ = tiny_llama_nf4
    packed = absmax = rest = 0
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        if qs is None:
            rest += p.numel()
            continue
        packed += p.numel() * p.element_size()
        absmax += qs.absmax.numel() * qs.absmax.element_size()
        if qs.nested:
            absmax += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
    facts = model_facts(tiny_llama_dir)
    layout = mem.QuantLayout(bits=4, shapes=facts.quant_shapes, double_quant=True)
    assert layout.storage() == (packed, absmax)
    assert facts.unquantized_params == rest
    est = estimate_memory(tiny_llama_dir, ll.AdapterSpec(), quant="nf4")
    assert est.chosen == "QLoRA"
    assert est.breakdown["base_weights"] == packed + 4 * rest
    assert est.breakdown["quant_constants"] == absmax
    # without double quantization: one fp32 absmax per 64 weights
    no_dq = estimate_memory(tiny_llama_dir, ll.AdapterSpec(), quant=ll.QuantSpec(double_quant=False))
    assert no_dq.breakdown["quant_constants"] == 4 * packed * 2 // 64


def test_terms_for_a_small_config_by_hand(tiny_llama_dir):
    spec = ll.AdapterSpec(r=4, target_modules=("q_proj",))
    est = estimate_memory(tiny_llama_dir, spec, batch_size=2, seq_len=16,
                          gradient_checkpointing=False, optimizer="adamw")
    cfg = model_facts(tiny_llama_dir).meta_model.config
    h, i, V, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    n = L * 4 * (h + h)                                   # q_proj: 64 -> 64 in every layer
    t = est.breakdown
    assert est.trainable["LoRA"] == n
    assert t["base_weights"] == 2 * est.total_params
    assert t["adapter_weights"] == 4 * n and t["optimizer_states"] == 8 * n
    T = 2 * 16
    # batch 2 counts as padded: KV heads repeated to h, and a bool mask b*s*s
    layer = 2 * 4 * h + 2 * (2 * h + 2 * h) + 3 * 2 * i + 2 * (h + 4)
    assert t["activations"] == T * L * layer + T * 4 * h + 2 * 16 * 16
    packed = estimate_memory(tiny_llama_dir, spec, batch_size=2, seq_len=16, padded=False,
                             gradient_checkpointing=False)
    layer_kv = 2 * 4 * h + 2 * (2 * h + 2 * kv) + 3 * 2 * i + 2 * (h + 4)
    assert packed.breakdown["activations"] == T * L * layer_kv + T * 4 * h
    assert t["logits"] == T * V * 12
    full = est.scenarios["full FT"]
    assert full["optimizer_states"] == 2 * 4 * est.total_params  # T4: fp32 master weights, fp32 AdamW
    assert est.peak_allocated() == pytest.approx(sum(
        t[k] for k in ("base_weights", "quant_constants", "adapter_weights", "gradients",
                       "optimizer_states", "activations", "logits")))
    with_ckpt = estimate_memory(tiny_llama_dir, spec, batch_size=2, seq_len=16,
                                gradient_checkpointing=True)
    assert with_ckpt.breakdown["activations"] < t["activations"]
    assert estimate_memory(tiny_llama_dir, spec, batch_size=2, seq_len=16,
                           optimizer="adamw_8bit").breakdown["optimizer_states"] < t["optimizer_states"]


def test_larger_inputs_cost_more_and_verdicts(tiny_llama_dir):
    small = estimate_memory(tiny_llama_dir, seq_len=64)
    big = estimate_memory(tiny_llama_dir, seq_len=4096, batch_size=8)
    assert big.need() > small.need()
    assert small.verdict() == "fits" and small.device == "T4"
    assert estimate_memory(tiny_llama_dir, device=0.01).verdict() == "does not fit"
    df = small.table()
    assert list(df.columns) == ["full FT", "LoRA", "QLoRA"] and "device need" in df.index
    assert "MemoryEstimate(" in repr(small) and "<table" in small._repr_html_()


def test_meta_device_only_for_a_large_config():
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=4,
                      num_attention_heads=64, num_key_value_heads=8, vocab_size=128256)
    facts = model_facts(cfg)
    assert all(p.device.type == "meta" for p in facts.meta_model.parameters())
    per_layer = 2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672 + 2 * 8192
    assert facts.total_params == 4 * per_layer + 2 * 128256 * 8192 + 8192


def test_errors_name_the_fix(tiny_llama_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="local folder"):
        estimate_memory("nobody/no-such-model-xyz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        estimate_memory(tmp_path / "empty")
    with pytest.raises(TargetModuleError, match="r <="):
        estimate_memory(tiny_llama_dir, ll.AdapterSpec(r=1000))
    with pytest.raises(TargetModuleError, match="q_proj"):
        estimate_memory(tiny_llama_dir, ll.AdapterSpec(target_modules=("query_key_value",)))
    with pytest.raises(TargetModuleError, match="layers"):
        estimate_memory(tiny_llama_dir, ll.AdapterSpec(layers=(7,)))
    for kw in ({"batch_size": 0}, {"seq_len": 1.5}, {"optimizer": "lion"}, {"device": "TPU"}):
        with pytest.raises(SpecError):
            estimate_memory(tiny_llama_dir, **kw)


@pytest.mark.gpu
def test_estimate_within_15_percent_of_a_measured_step():
    """A LoRA training step on a small Llama: max_memory_allocated within ±15% of the estimate."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                      num_attention_heads=16, num_key_value_heads=4, vocab_size=32000)
    spec = ll.AdapterSpec(r=16)
    est = estimate_memory(cfg, spec, batch_size=4, seq_len=512, gradient_checkpointing=False,
                          padded=False, chunked_loss=False)  # no attention mask below; the HF loss
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).cuda()
    model = ll.attach(model, spec)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], fused=True)
    ids = torch.randint(0, 32000, (4, 512), device="cuda")
    for _ in range(2):                                    # the 2nd step holds optimizer states
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del loss
    measured = torch.cuda.max_memory_allocated()
    assert abs(est.peak_allocated() - measured) / measured < 0.15
