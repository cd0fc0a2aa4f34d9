"""count_parameters (issue 16, item 7): a model without adapters reports no adapter, and sizes
carry honest units (MiB = 2**20 bytes, MB = 10**6 bytes)."""

import lora_lab as ll


def test_a_plain_model_has_no_adapter(tiny_llama):
    model, _ = tiny_llama
    c = ll.count_parameters(model)
    assert c.has_adapter is False and c.adapter_bytes == 0
    assert c.trainable == c.total == model.num_parameters()          # transformers' own count
    assert c.trainable == model.num_parameters(only_trainable=True)
    text = repr(c) + c._repr_html_()
    assert "no adapter" in text and "full model" in text
    assert "adapter file" not in text and "MB" not in text


def test_a_frozen_plain_model_trains_nothing(tiny_llama):
    model, _ = tiny_llama
    model.requires_grad_(False)
    c = ll.count_parameters(model)
    assert c.trainable == 0 and not c.has_adapter and "nothing trainable" in repr(c)


def test_adapter_sizes_are_labelled_with_their_units(tiny_llama):
    model, _ = tiny_llama
    pm = ll.attach(model, ll.AdapterSpec(r=4))
    c = ll.count_parameters(pm)
    trainable = [p for p in pm.parameters() if p.requires_grad]
    assert c.has_adapter
    assert c.adapter_bytes == sum(p.numel() * p.element_size() for p in trainable)
    assert c.adapter_mib == c.adapter_bytes / 2**20
    assert c.adapter_mb == c.adapter_bytes / 1e6
    assert f"adapter file {c.adapter_bytes / 2**20:.2f} MiB" in repr(c)
    assert " MB" not in repr(c)
