"""``export_merged``: the folder loads with plain transformers and reproduces the unmerged adapter.

Oracles: the logits of the unmerged peft model (computed here, in train mode so that bitsandbytes
does not repack 4-bit weights, with no dropout in the tiny Llama), and the weight formula
W' = W + s·B·A with s = α/r or α/√r (rsLoRA), with W dequantized for a 4-bit base.
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from lora_testing import randomize_lora_b
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import lora_lab as ll
from lora_lab.export.merged import MergedExport, export_merged

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = torch.randint(3, 90, (2, 16), generator=torch.Generator().manual_seed(7))
Q = "model.layers.0.self_attn.q_proj"


def _lora(model, **spec):
    model = ll.attach(model, ll.AdapterSpec(**{"r": 4, "target_modules": "all-linear", **spec}))
    return randomize_lora_b(model, seed=0, scale=0.05)  # B = 0 at init: give ΔW a size


@torch.no_grad()
def _logits(model):
    model.train()                              # no 4-bit repacking; the tiny Llama has no dropout
    return model(input_ids=IDS).logits.float()


def _export(model, path, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = export_merged(model, path, **kw)
    assert any("export_merged: writing" in str(w.message) and "MiB" in str(w.message)
               for w in caught)
    return out


def _stored(path, name):
    index = path / "model.safetensors.index.json"
    fname = json.loads(index.read_text())["weight_map"][name] if index.exists() \
        else "model.safetensors"
    with safe_open(path / fname, "pt") as f:
        return f.get_tensor(name)


def _factors(model, module=Q):
    layer = model.get_base_model().get_submodule(module)
    return layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()


def _assert_unmerged(model, before):
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert layers and not any(m.merged for m in layers)
    assert model.active_adapter == "default"
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=0)


def test_fp32_export_loads_with_transformers_and_matches(tiny_llama, tmp_path):
    model = _lora(tiny_llama[0])
    before = _logits(model)
    out = _export(model, tmp_path / "m", dtype=torch.float32, tokenizer=tiny_llama[1])
    assert isinstance(out, MergedExport) and out.shards == 1 and out.dtype == "float32"
    assert out.rel_logit_diff < 1e-5 and "float32" in repr(out)
    assert "rel_logit_diff" in out._repr_html_() and "1 shard(s)" in repr(out)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert not hasattr(merged, "peft_config") and "lora" not in str(list(merged.state_dict()))
    with torch.no_grad():
        got = merged.eval()(input_ids=IDS).logits
    torch.testing.assert_close(got, before, rtol=1e-4, atol=1e-4)
    A, B = _factors(model)
    W = model.get_base_model().get_submodule(Q).base_layer.weight.detach()
    torch.testing.assert_close(_stored(tmp_path / "m", Q + ".weight"), W + 2.0 * B @ A)  # α=2r
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(out.files)
    _assert_unmerged(model, before)


def test_fp16_export_is_stored_in_fp16_and_close(tiny_llama, tmp_path):
    model = _lora(tiny_llama[0])
    before = _logits(model)
    out = _export(model, tmp_path / "m", dtype="float16")
    assert _stored(tmp_path / "m", Q + ".weight").dtype == torch.float16
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "float16"
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    with torch.no_grad():
        got = merged.eval()(input_ids=IDS).logits
    rel = float((got - before).norm() / before.norm())
    assert 1e-6 < rel < 5e-3 and out.rel_logit_diff < 5e-3       # fp16 rounding, and only that
    _assert_unmerged(model, before)


def test_small_shards_have_a_valid_index(tiny_llama, tmp_path):
    model = _lora(tiny_llama[0], target_modules="attention-qv")
    limit = 60_000
    out = _export(model, tmp_path / "m", dtype=torch.float32, max_shard_size=limit, check=False)
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert out.shards == len(shards) > 1 and out.rel_logit_diff is None
    assert shards[0] == f"model-00001-of-{out.shards:05d}.safetensors"
    keys, total = {}, 0
    for fname in shards:
        with safe_open(tmp_path / "m" / fname, "pt") as f:
            sizes = [f.get_tensor(k).numel() * 4 for k in f.keys()]
            keys.update({k: fname for k in f.keys()})
        assert sum(sizes) <= limit or len(sizes) == 1          # a shard over the limit holds one
        total += sum(sizes)
    assert keys == index["weight_map"] and total == index["metadata"]["total_size"]
    base = model.get_base_model()
    expected = {k.replace("base_layer.", "") for k in base.state_dict() if "lora_" not in k}
    assert set(keys) == expected
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(input_ids=IDS).logits, _logits(model),
                                   rtol=1e-4, atol=1e-4)


def test_qlora_nf4_merges_into_dequantized_weights(tiny_llama_nf4, tmp_path):
    import bitsandbytes.functional as F

    model = _lora(tiny_llama_nf4[0])
    before = _logits(model)
    out = _export(model, tmp_path / "m", dtype=torch.float32)
    assert out.from_quantized and out.rel_logit_diff < 1e-3
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert not getattr(merged, "is_loaded_in_4bit", False)
    assert "quantization_config" not in json.loads((tmp_path / "m" / "config.json").read_text())
    with torch.no_grad():
        got = merged.eval()(input_ids=IDS).logits
    assert float((got - before).norm() / before.norm()) < 1e-3
    layer = model.get_base_model().get_submodule(Q).base_layer
    W = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    A, B = _factors(model)
    torch.testing.assert_close(_stored(tmp_path / "m", Q + ".weight"), W + 2.0 * B @ A)
    packed = [getattr(m.weight.quant_state, "packing_format_for_cpu", False)
              for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert packed and not any(packed)                 # export did not repack the 4-bit weights
    _assert_unmerged(model, before)


def test_rslora_uses_alpha_over_sqrt_r(tiny_llama, tmp_path):
    model = _lora(tiny_llama[0], r=4, alpha=8, use_rslora=True, target_modules="attention-qv")
    _export(model, tmp_path / "m", dtype=torch.float32, check=False)
    A, B = _factors(model)
    W = model.get_base_model().get_submodule(Q).base_layer.weight.detach()
    got = _stored(tmp_path / "m", Q + ".weight")
    torch.testing.assert_close(got, W + (8 / math.sqrt(4)) * B @ A)
    assert not torch.allclose(got, W + (8 / 4) * B @ A, atol=1e-4)


def test_dora_matches_the_unmerged_model(tiny_llama, tmp_path):
    model = _lora(tiny_llama[0], use_dora=True, target_modules="attention-qv")
    with torch.no_grad():                              # a magnitude that is not ‖W‖ any more
        for name, p in model.named_parameters():
            if "magnitude" in name:
                p.mul_(1.2)
    before = _logits(model)
    out = _export(model, tmp_path / "m", dtype=torch.float32)
    assert out.rel_logit_diff < 1e-5
    _assert_unmerged(model, before)


def test_bad_inputs_raise_lora_lab_errors(tiny_llama, tmp_path):
    plain = tiny_llama[0]
    with pytest.raises(ll.LoraLabError, match="attach"):
        export_merged(plain, tmp_path / "a")
    model = _lora(plain, target_modules="attention-qv")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("keep")
    with pytest.raises(ll.LoraLabError, match="not empty"):
        export_merged(model, tmp_path / "used")
    with pytest.raises(ll.LoraLabError, match="dtype"):
        export_merged(model, tmp_path / "b", dtype="int4")
    with pytest.raises(ll.LoraLabError, match="max_shard_size"):
        export_merged(model, tmp_path / "b", max_shard_size="lots")
    assert not (tmp_path / "b").exists()                     # nothing written before the checks
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = export_merged(model, tmp_path / "used", overwrite=True, check=False)
    assert (tmp_path / "used" / "notes.txt").exists() and "model.safetensors" in out.files
    ll.merge_adapter(model)
    with pytest.raises(ll.LoraLabError, match="unmerge"):
        export_merged(model, tmp_path / "c")
    ll.unmerge_adapter(model)
    ll.set_adapter(model, None)
    with pytest.raises(ll.LoraLabError, match="switched off"):
        export_merged(model, tmp_path / "c")


def test_prompt_tuning_is_refused(tiny_llama, tmp_path):
    model = ll.attach(tiny_llama[0], ll.AdapterSpec(method="prompt", num_virtual_tokens=4))
    with pytest.raises(ll.LoraLabError, match="PROMPT_TUNING|prompt"):
        export_merged(model, tmp_path / "p")


def test_int8_base_merges_into_row_scaled_weights(tiny_llama_dir, tmp_path):
    model = _lora(ll.load_model(tiny_llama_dir, quant="int8", device="cpu")[0],
                  target_modules="attention-qv")
    out = _export(model, tmp_path / "m", dtype=torch.float32)
    layer = model.get_base_model().get_submodule(Q).base_layer
    scb = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB  # moved by forward
    W = layer.weight.data.float() * scb.float()[:, None] / 127                  # LLM.int8() rows
    A, B = _factors(model)
    torch.testing.assert_close(_stored(tmp_path / "m", Q + ".weight"), W + 2.0 * B @ A)
    # int8 inference also quantizes activations, so the unmerged model differs by that error
    assert out.from_quantized and out.rel_logit_diff < 0.05


def test_tied_embeddings_are_written_once_and_stay_tied(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = _lora(LlamaForCausalLM(cfg))
    before = _logits(model)
    out = _export(model, tmp_path / "m", dtype=torch.float32)
    with safe_open(tmp_path / "m" / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(input_ids=IDS).logits, before,
                                   rtol=1e-4, atol=1e-4)
    assert out.rel_logit_diff < 1e-5
