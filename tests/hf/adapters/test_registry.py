"""list_adapters / adapter_sizes: each adapter's modules, parameters and bytes, against the file peft
writes for it."""

import pytest
from safetensors import safe_open

import lora_lab as ll
from lora_lab.hf.adapters.registry import adapter_sizes


@pytest.mark.parametrize("specs", [
    {"qv": ll.AdapterSpec(r=4, target_modules="attention-qv"),
     "mlp": ll.AdapterSpec(r=2, target_modules=("down_proj",), layers=(1,))},
    {"scale": ll.AdapterSpec(method="ia3")},
    {"magnitude": ll.AdapterSpec(r=4, use_dora=True)},
    {"kv": ll.AdapterSpec(method="prefix", num_virtual_tokens=4)},
    {"soft": ll.AdapterSpec(method="prompt", num_virtual_tokens=4)},
], ids=["two-lora-one-named-like-a-module", "ia3", "dora", "prefix", "prompt"])
def test_sizes_equal_what_each_adapters_saved_file_holds(tiny_llama_dir, tmp_path, specs):
    pm, _ = ll.load_model(tiny_llama_dir, device="cpu")
    for name, spec in specs.items():
        pm = ll.attach(pm, spec, name=name)
    sizes = adapter_sizes(pm)
    table = ll.list_adapters(pm).set_index("name")
    for name in specs:
        path = ll.save_adapter(pm, tmp_path / name, adapter=name)
        with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as f:
            tensors = [f.get_tensor(k) for k in f.keys()]
            modules = sum(".lora_A." in k or "ia3_l" in k for k in f.keys())
        assert sizes[name]["params"] == sum(t.numel() for t in tensors) == table.at[name, "params"]
        assert sizes[name]["bytes"] == sum(t.numel() * t.element_size() for t in tensors)
        assert sizes[name]["modules"] == modules == table.at[name, "modules"]
