"""Specs are validated when made; errors name the field, the value and the fix."""

import pytest

import lora_lab as ll
from lora_lab.errors import LoraLabError, SpecError


@pytest.mark.parametrize("kwargs, field", [
    (dict(r=0), "r"), (dict(r=2.5), "r"), (dict(alpha=-1), "alpha"), (dict(dropout=1.0), "dropout"),
    (dict(method="adalora"), "method"), (dict(target_modules=[]), "target_modules"),
    (dict(layers=[-1]), "layers"), (dict(init="xavier"), "init"), (dict(bias="some"), "bias"),
    (dict(method="prefix", use_dora=True), "use_dora"), (dict(num_virtual_tokens=0), "num_virtual_tokens"),
    (dict(use_dora=True, init="pissa"), "init"),
])
def test_adapter_spec_rejects_bad_values(kwargs, field):
    with pytest.raises(SpecError) as e:
        ll.AdapterSpec(**kwargs)
    assert e.value.field == field
    msg = str(e.value)
    assert f"AdapterSpec.{field}" in msg and "Fix:" in msg or "choose one of" in msg
    assert isinstance(e.value, LoraLabError) and isinstance(e.value, ValueError)


def test_adapter_spec_defaults_and_scaling():
    s = ll.AdapterSpec(r=16)
    assert s.alpha == 32.0 and s.scaling == 2.0
    rs = ll.AdapterSpec(r=16, alpha=16, use_rslora=True)
    assert rs.scaling == pytest.approx(16 / 4)
    assert ll.AdapterSpec(target_modules="attention-qv").target_modules == ("q_proj", "v_proj")
    assert ll.AdapterSpec(target_modules="q_proj").target_modules == ("q_proj",)
    assert ll.AdapterSpec(layers=[3, 1, 1]).layers == (1, 3)
    # frozen: a spec is a value
    with pytest.raises(Exception):
        s.r = 4
    assert s.replace(r=4).r == 4 and s.replace(r=4).alpha == 32.0


def test_quant_spec_shorthands_and_errors():
    assert ll.QuantSpec.parse("nf4") == ll.QuantSpec(bits=4, quant_type="nf4")
    assert ll.QuantSpec.parse("FP4").quant_type == "fp4"
    q8 = ll.QuantSpec.parse("int8")
    assert q8.bits == 8 and q8.quant_type is None and q8.name == "int8"
    assert ll.QuantSpec.parse(None) is None
    with pytest.raises(SpecError, match="nf4"):
        ll.QuantSpec.parse("int3")
    with pytest.raises(SpecError, match="bits"):
        ll.QuantSpec(bits=3)
    with pytest.raises(SpecError, match="compute_dtype"):
        ll.QuantSpec(compute_dtype="float64")


def test_data_and_train_specs_validate():
    with pytest.raises(SpecError, match="max_length"):
        ll.DataSpec(max_length=1)
    with pytest.raises(SpecError, match="template"):
        ll.DataSpec(template="no placeholder")
    with pytest.raises(SpecError, match="lr"):
        ll.TrainSpec(lr=5)
    with pytest.raises(SpecError, match="optimizer"):
        ll.TrainSpec(optimizer="lion")
    assert ll.TrainSpec().steps == 100


def test_to_peft_config_maps_every_field():
    import peft

    cfg = ll.to_peft_config(ll.AdapterSpec(r=4, alpha=8, dropout=0.1, target_modules=("q_proj",),
                                           init="gaussian", use_rslora=True, layers=(0,)))
    assert isinstance(cfg, peft.LoraConfig)
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.init_lora_weights, cfg.use_rslora) == \
        (4, 8.0, 0.1, "gaussian", True)
    assert set(cfg.target_modules) == {"q_proj"} and cfg.layers_to_transform == [0]
    assert isinstance(ll.to_peft_config(ll.AdapterSpec(method="prefix")), peft.PrefixTuningConfig)
    assert isinstance(ll.to_peft_config(ll.AdapterSpec(method="prompt")), peft.PromptTuningConfig)
    assert isinstance(ll.to_peft_config(ll.AdapterSpec(method="ia3")), peft.IA3Config)
