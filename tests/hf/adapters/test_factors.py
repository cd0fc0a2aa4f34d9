"""lora_factors on a live model (incl. a 4-bit base), and LoRA factors read from a saved adapter
folder without its base, which equal the live model's:
same modules in the same order, same A and B, and the scaling peft gives each module (α/r,
α/√r with rsLoRA, rank_pattern and alpha_pattern)."""

import json

import peft
import pytest
import torch

import lora_lab as ll
from lora_testing import randomize_lora, randomize_lora_b
from lora_lab.errors import AdapterError
from lora_lab.hf.adapters.factors import lora_factors, saved_lora_factors


def _same(live, saved):
    assert [f.name for f in saved] == [f.name for f in live]
    for a, b in zip(live, saved):
        assert b.scaling == pytest.approx(a.scaling, rel=1e-12), a.name
        assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B), a.name


@pytest.mark.parametrize("spec", [ll.AdapterSpec(r=4, target_modules="all-linear"),
                                  ll.AdapterSpec(r=8, alpha=8, use_rslora=True,
                                                 target_modules=("q_proj", "down_proj"))])
def test_saved_factors_equal_the_loaded_adapter(tiny_llama, tmp_path, spec):
    model = randomize_lora_b(ll.attach(tiny_llama[0], spec))
    path = ll.save_adapter(model, tmp_path / "a")
    # the folder names a base that does not exist: nothing may try to load it
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "no-such-base")
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    _same(list(lora_factors(model)), saved_lora_factors(path))
    from_file, live = ll.adapter_spectra(path), ll.adapter_spectra(model)
    assert from_file.table.equals(live.table)


def test_rank_and_alpha_patterns_give_peft_scalings(tiny_llama, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                             rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 32},
                             task_type="CAUSAL_LM")
    model = randomize_lora_b(peft.get_peft_model(tiny_llama[0], config))
    model.save_pretrained(tmp_path / "p")
    live = list(lora_factors(model))
    assert {f.scaling for f in live} == {2.0, 8.0, 4.0}       # 8/4, 32/4, 8/2: the oracle is peft
    _same(live, saved_lora_factors(tmp_path / "p"))


def test_non_lora_and_missing_folders_are_refused(tiny_llama, tmp_path):
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        saved_lora_factors(tmp_path)
    model = ll.attach(tiny_llama[0], ll.AdapterSpec(method="ia3"))
    path = ll.save_adapter(model, tmp_path / "ia3")
    with pytest.raises(AdapterError, match="LoRA adapters only"):
        saved_lora_factors(path)


def test_lora_factors_on_a_4bit_base(tiny_llama_nf4):
    model, _ = tiny_llama_nf4
    pm = ll.attach(model, ll.AdapterSpec(r=4, alpha=4, target_modules="attention-qv"))
    randomize_lora(pm, "default")
    fs = list(ll.lora_factors(pm))
    assert len(fs) == 2 * model.config.num_hidden_layers
    cfg = model.config
    for f in fs:
        out = cfg.hidden_size if f.module_type == "q_proj" else \
            cfg.num_key_value_heads * cfg.hidden_size // cfg.num_attention_heads
        assert f.shape == (out, cfg.hidden_size) and f.scaling == 1.0 and f.r == 4
        assert f.A.dtype == torch.float32 and f.delta().abs().sum() > 0
    with pytest.raises(AdapterError, match="No LoRA module"):
        list(ll.lora_factors(pm, "missing"))
