"""load_model: builtin names, local folders (the real from_pretrained path), quantization on CPU."""

import pytest
import torch

import lora_lab as ll
from lora_lab.errors import ModelLoadError


def test_builtin_random_loads_offline():
    model, tok = ll.load_model("builtin:tiny-random")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert tok.pad_token is not None and model.dtype == torch.float32
    ids = tok("12+3=", return_tensors="pt").input_ids
    assert model(input_ids=ids).logits.shape[-1] == model.config.vocab_size


def test_local_folder_round_trip(tiny_llama_dir, tiny_llama):
    from transformers import AutoModelForCausalLM

    model, tok = tiny_llama
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    ids = torch.randint(4, 90, (2, 10))
    assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)


def _bnb_round_trip(module, weight: torch.Tensor) -> tuple[bool, torch.Tensor]:
    """bitsandbytes' own quantization of the fp32 ``weight``, with the layer's settings:
    ``(stored codes equal it, the dequantized weight)``.  ``Int8Params`` quantizes an fp16 copy
    row-wise (LLM.int8(): absmax per output row, ``int8_vectorwise_quant``)."""
    import bitsandbytes.functional as F

    p = module.weight
    if type(p).__name__ == "Params4bit":
        qs = p.quant_state
        codes, state = F.quantize_4bit(weight, blocksize=qs.blocksize, quant_type=qs.quant_type,
                                       compress_statistics=qs.nested)
        return torch.equal(codes, p.data), F.dequantize_4bit(codes, state).float()
    codes, scales, _ = F.int8_vectorwise_quant(weight.half())
    stored = p.SCB if p.SCB is not None else module.state.SCB   # moved to the state by a forward
    same = torch.equal(codes, p.data) and torch.equal(scales.float(), stored.float())
    return same, F.int8_vectorwise_dequant(codes, scales).float()


# (layer class, relative logit error bounds) per scheme.  Measured on this tiny Llama (random
# N(0, 0.02²) weights, 12 fixed tokens): nf4 0.129, fp4 0.125, int8 0.0118; per-layer weight error nf4
# 0.092, fp4 0.122 (bitsandbytes' figures for Gaussian weights: 0.092 and 0.122) and int8 0.006.
SCHEMES = {"nf4": ("Linear4bit", 0.05, 0.25), "fp4": ("Linear4bit", 0.05, 0.25),
           "int8": ("Linear8bitLt", 0.002, 0.03)}
WEIGHT_ERROR = {"nf4": (0.085, 0.10), "fp4": (0.11, 0.135), "int8": (0.004, 0.008)}


@pytest.mark.parametrize("quant", list(SCHEMES))
def test_quantized_load_on_cpu(tiny_llama_dir, quant):
    cls, low, high = SCHEMES[quant]
    model, _ = ll.load_model(tiny_llama_dir, quant=quant, device="cpu")
    full, _ = ll.load_model(tiny_llama_dir)
    table = ll.inspect_model(model)
    assert table["quantized"].all()
    # every adapted linear is quantized, the LM head is not, and each stored weight is exactly what
    # bitsandbytes' own quantize gives for the fp32 weight (oracle outside lora_lab)
    full_modules = dict(full.named_modules())
    quantized = {n: m for n, m in model.named_modules() if type(m).__name__ == cls}
    assert set(quantized) == set(table["name"]) and type(model.lm_head).__name__ == "Linear"
    dequantized = {}
    for name, m in quantized.items():
        same, dequantized[name] = _bnb_round_trip(m, full_modules[name].weight.detach())
        assert same, f"{name}: stored weight is not bitsandbytes' quantization of the fp32 one"
        w = full_modules[name].weight.detach()
        err = float((dequantized[name] - w).norm() / w.norm())
        assert WEIGHT_ERROR[quant][0] < err < WEIGHT_ERROR[quant][1], (name, err)
    ids = torch.randint(4, 90, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(input_ids=ids).logits.float(), full(input_ids=ids).logits
        for name, w in dequantized.items():      # the fp32 model with bitsandbytes' round trip
            full_modules[name].weight.copy_(w)
        c = full(input_ids=ids).logits
    rel = float((a - b).norm() / b.norm())
    assert low < rel < high, (quant, rel)
    if cls == "Linear4bit":
        # 4-bit forwards dequantize and multiply in fp32: exactly the round-tripped fp32 model
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
    else:
        # LLM.int8() also quantizes the activations (outliers above 6 kept in fp16), so it is
        # only near the weight-only round trip: measured 0.0075 relative
        assert float((a - c).norm() / c.norm()) < 0.02


def test_quant_spec_compute_dtype_defaults_to_fp32_on_cpu(tiny_llama_dir):
    from lora_lab.hf.model.loading import bnb_config

    cfg = bnb_config(ll.QuantSpec.parse("nf4"), "cpu")
    assert cfg.bnb_4bit_compute_dtype == torch.float32 and cfg.bnb_4bit_use_double_quant


def test_unknown_sources_give_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="builtin"):
        ll.load_model("builtin:nope")
    with pytest.raises(ModelLoadError, match="config.json"):
        ll.load_model(tmp_path)
    with pytest.raises(ModelLoadError, match="does not exist"):
        ll.load_model("./no/such/folder")
    # offline (conftest sets HF_HUB_OFFLINE=1) with an unknown hub id
    with pytest.raises(ModelLoadError, match="local folder or a builtin name"):
        ll.load_model("someone/not-a-real-model-xyz")


def test_inspect_model_table(tiny_llama):
    model, _ = tiny_llama
    t = ll.inspect_model(model)
    cfg = model.config
    assert len(t) == 7 * cfg.num_hidden_layers  # lm_head is left out
    assert set(t["module_type"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                     "up_proj", "down_proj"}
    kv = t[t.module_type == "k_proj"].iloc[0]
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert (kv.in_features, kv.out_features) == (cfg.hidden_size,
                                                 cfg.num_key_value_heads * head_dim)
    assert sorted(t["layer"].unique()) == list(range(cfg.num_hidden_layers))
    assert (t["params"] == t["in_features"] * t["out_features"]).all()


@pytest.mark.gpu
def test_cuda_compute_dtype_follows_the_device(tiny_llama_dir):
    model, _ = ll.load_model(tiny_llama_dir, quant="nf4", device="cuda")
    want = torch.bfloat16 if torch.cuda.get_device_capability()[0] >= 8 else torch.float16  # T4: fp16
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.compute_dtype == want
