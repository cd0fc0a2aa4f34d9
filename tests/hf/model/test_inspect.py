"""count_parameters and the adapter's size: against closed-form counts and the saved file."""

import pytest

import lora_lab as ll


@pytest.mark.parametrize("spec", [
    ll.AdapterSpec(r=4), ll.AdapterSpec(r=8, target_modules="attention-qv"),
    ll.AdapterSpec(r=2, layers=(1,)), ll.AdapterSpec(r=3, target_modules=("gate_proj", "down_proj")),
])
def test_lora_parameter_count_equals_formula(tiny_llama, spec):
    model, _ = tiny_llama
    table = ll.inspect_model(model)
    sel = table if spec.target_modules == "all-linear" else table[table.module_type.isin(spec.target_modules)]
    if spec.layers:
        sel = sel[sel.layer.isin(spec.layers)]
    expected = int((spec.r * (sel.in_features + sel.out_features)).sum())
    total_before = ll.count_parameters(model).total
    pm = ll.attach(model, spec)
    c = ll.count_parameters(pm)
    assert c.trainable == expected
    assert c.total == total_before + expected
    assert c.percent == pytest.approx(100 * expected / c.total)


def test_count_on_4bit_base_counts_logical_parameters(tiny_llama_dir, tiny_llama_nf4):
    full, _ = ll.load_model(tiny_llama_dir)
    q, _ = tiny_llama_nf4
    assert ll.count_parameters(q).total == ll.count_parameters(full).total


def test_adapter_bytes_match_the_saved_file(tiny_llama, tmp_path):
    model, _ = tiny_llama
    pm = ll.attach(model, ll.AdapterSpec(r=4))
    path = ll.save_adapter(pm, tmp_path / "a")
    size = (path / "adapter_model.safetensors").stat().st_size
    est = ll.count_parameters(pm).adapter_bytes
    assert est <= size <= est + 16 * 1024  # payload plus the safetensors JSON header
