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


@pytest.mark.parametrize("quant, cls", [("nf4", "Linear4bit"), ("fp4", "Linear4bit"),
                                        ("int8", "Linear8bitLt")])
def test_quantized_load_on_cpu(tiny_llama_dir, quant, cls):
    model, _ = ll.load_model(tiny_llama_dir, quant=quant, device="cpu")
    layer = model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == cls
    table = ll.inspect_model(model)
    assert table["quantized"].all()
    full, _ = ll.load_model(tiny_llama_dir)
    ids = torch.randint(4, 90, (1, 12))
    with torch.no_grad():
        a, b = model(input_ids=ids).logits.float(), full(input_ids=ids).logits
    rel = float((a - b).norm() / b.norm())
    assert 0 < rel < 0.5  # quantized, so not identical; but still the same model


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
