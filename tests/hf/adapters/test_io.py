"""save_adapter / load_adapter: identical outputs after a round trip, clear errors for wrong bases
and pickles."""

import pytest
import torch
from lora_testing import logits, randomize_lora

import lora_lab as ll
from lora_lab.errors import AdapterError, AdapterMismatchError


def test_save_load_round_trip_gives_identical_outputs(tiny_llama_dir, tmp_path):
    model, _ = ll.load_model(tiny_llama_dir)
    spec = ll.AdapterSpec(r=4, alpha=8, target_modules="attention", use_rslora=True)
    pm = ll.attach(model, spec)
    randomize_lora(pm, "default")
    ref = logits(pm)
    path = ll.save_adapter(pm, tmp_path / "ad")
    assert (path / "adapter_model.safetensors").exists() and not list(path.glob("*.bin"))
    base2, _ = ll.load_model(tiny_llama_dir)
    pm2 = ll.load_adapter(base2, path)
    torch.testing.assert_close(logits(pm2), ref)
    assert list(pm2.peft_config) == ["ad"] and pm2.lora_lab_specs["ad"] == spec  # the folder name
    # saving again over the same folder replaces it atomically and leaves no temp folders
    ll.save_adapter(pm, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]


def test_load_onto_wrong_base_names_shapes(tiny_llama, tmp_path):
    model, _ = tiny_llama
    pm = ll.attach(model, ll.AdapterSpec(r=2))
    path = ll.save_adapter(pm, tmp_path / "ad")
    other, _ = ll.load_model("builtin:tiny-random")  # hidden 128, not 64
    with pytest.raises(AdapterMismatchError, match=r"saved \(2, 64\)"):
        ll.load_adapter(other, path)


def test_load_refuses_pickles_and_non_adapters(tiny_llama, tmp_path):
    model, _ = tiny_llama
    with pytest.raises(AdapterError, match="adapter_config.json"):
        ll.load_adapter(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"x")
    with pytest.raises(AdapterError, match="never unpickles"):
        ll.load_adapter(model, tmp_path)
