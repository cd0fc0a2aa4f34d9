"""hf/_peft.py, the one place that knows peft's internal names, checked against peft's own view."""

import peft
import pytest

import lora_lab as ll
from lora_lab.errors import AdapterError, BlendError
from lora_lab.hf._peft import (PREFIX, active_name, check_adapter_name, is_peft, lora_layers,
                               require_adapter, require_peft, strip_prefix)


def test_lora_layers_are_the_modules_peft_saves(tiny_llama):
    model, _ = tiny_llama
    pm = ll.attach(model, ll.AdapterSpec(r=4, target_modules="attention-qv"))
    pm = ll.attach(pm, ll.AdapterSpec(r=2, target_modules=("down_proj",), layers=(1,)), name="mlp")
    saved = peft.get_peft_model_state_dict(pm, adapter_name="mlp")        # peft's own naming
    expected = [k.removesuffix(".lora_A.weight") for k in saved if k.endswith(".lora_A.weight")]
    assert expected and all(k.startswith(PREFIX) for k in expected)      # peft's prefix is PREFIX
    assert [strip_prefix(k) for k in expected] == [n for n, _ in lora_layers(pm, "mlp")]
    assert len(list(lora_layers(pm))) == len(list(lora_layers(pm, "default"))) + 1
    for name, layer in lora_layers(pm, "default"):
        assert not name.startswith(PREFIX) and "default" in layer.lora_A


def test_is_peft_active_name_and_the_requirements(tiny_llama):
    model, _ = tiny_llama
    assert not is_peft(model) and active_name(model) is None
    with pytest.raises(AdapterError, match="no adapters yet"):
        require_peft(model)
    pm = ll.attach(model, ll.AdapterSpec(r=2), name="math")
    assert is_peft(pm) and require_peft(pm) is pm
    assert active_name(pm) == "math" == active_name(pm.base_model)  # str on PeftModel, list on tuner
    assert active_name(pm, "other") == "other"
    with pytest.raises(AdapterError, match=r"pass one of \[.math.\]"):
        require_adapter(pm, "b")


@pytest.mark.parametrize("name", ["half", "keys", "a.b", "", 3])
def test_names_peft_cannot_store_are_refused_with_the_callers_error(name):
    with pytest.raises(AdapterError) as info:
        check_adapter_name(name)
    assert "Fix:" in str(info.value) or info.value.fix
    with pytest.raises(BlendError):
        check_adapter_name(name, BlendError)
    check_adapter_name("math")


def test_base_of_unwraps_peft_and_its_compile_wrapper_and_leaves_a_bare_model():
    import torch

    import lora_lab as ll
    from lora_lab.hf._peft import base_of

    model, _ = ll.load_model("builtin:tiny", device="cpu")
    assert base_of(model) is model
    wrapped = ll.attach(model, ll.AdapterSpec(r=4))
    assert base_of(wrapped) is wrapped.get_base_model() and base_of(wrapped) is not wrapped
    assert base_of(torch.compile(wrapped)) is wrapped.get_base_model()   # attributes forwarded
