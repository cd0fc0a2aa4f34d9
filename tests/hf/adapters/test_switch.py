"""Switching and disabling adapters on one base, against each adapter loaded alone and the bare base."""

import pytest
import torch

import lora_lab as ll
from lora_lab.errors import (AdapterError)
from lora_testing import logits, randomize_lora


def test_switching_and_disabling(tiny_llama_dir, tiny_llama, tmp_path):
    model, _ = tiny_llama
    base = logits(model)
    pm = ll.attach(model, ll.AdapterSpec(r=4), name="add")
    randomize_lora(pm, "add", seed=1)
    pm = ll.attach(pm, ll.AdapterSpec(r=2, target_modules="mlp"), name="sub")
    randomize_lora(pm, "sub", seed=2)
    ll.set_adapter(pm, "add")
    out_a = logits(pm)
    ll.set_adapter(pm, "sub")
    out_b = logits(pm)
    assert not torch.allclose(out_a, out_b) and not torch.allclose(out_a, base)
    # each equals the adapter loaded alone
    ll.save_adapter(pm, tmp_path / "sub", adapter="sub")
    alone, _ = ll.load_model(tiny_llama_dir)
    torch.testing.assert_close(logits(ll.load_adapter(alone, tmp_path / "sub")), out_b)
    with ll.disabled_adapters(pm):
        assert torch.equal(logits(pm), base)
    ll.set_adapter(pm, None)
    assert torch.equal(logits(pm), base) and ll.active_adapter(pm) is None
    ll.set_adapter(pm, "add")
    torch.testing.assert_close(logits(pm), out_a)
    table = ll.list_adapters(pm)
    assert list(table.name) == ["add", "sub"] and table.set_index("name").at["add", "active"]
    assert table.set_index("name").at["sub", "modules"] == 3 * model.config.num_hidden_layers
    ll.delete_adapter(pm, "sub")
    assert list(pm.peft_config) == ["add"]
    with pytest.raises(AdapterError, match="only adapter"):
        ll.delete_adapter(pm, "add")
    with pytest.raises(AdapterError, match="no adapter named"):
        ll.set_adapter(pm, "zzz")
