"""Specs are validated when made; errors name the field, the value and the fix."""

import pytest

import lora_lab as ll
from lora_lab.errors import LoraLabError, SpecError

# For every spec, every field: bad values, and the field the error must name.  Fields a spec does
# not validate are listed in UNCHECKED with the reason, so that a new field shows up here.
BAD = {
    ll.AdapterSpec: [
        (dict(method="adalora"), "method"), (dict(method="LoRA"), "method"), (dict(method=None), "method"),
        (dict(r=0), "r"), (dict(r=2.5), "r"), (dict(r=True), "r"),
        (dict(alpha=-1), "alpha"), (dict(alpha=float("nan")), "alpha"), (dict(alpha=True), "alpha"),
        (dict(dropout=1.0), "dropout"), (dict(dropout=-0.1), "dropout"),
        (dict(target_modules=[]), "target_modules"), (dict(target_modules=["q_proj", ""]), "target_modules"),
        (dict(layers=[-1]), "layers"), (dict(layers=[]), "layers"),
        (dict(init="xavier"), "init"), (dict(init=None), "init"), (dict(init=["pissa"]), "init"),
        (dict(bias="some"), "bias"), (dict(bias=None), "bias"), (dict(bias=False), "bias"),
        (dict(method="prefix", use_dora=True), "use_dora"),
        (dict(method="ia3", use_rslora=True), "use_rslora"),
        (dict(num_virtual_tokens=0), "num_virtual_tokens"),
        (dict(num_virtual_tokens=2.0), "num_virtual_tokens"),
        (dict(use_dora=True, init="pissa"), "init"), (dict(method="prompt", init="gaussian"), "init"),
    ],
    ll.QuantSpec: [
        (dict(bits=3), "bits"), (dict(bits=4.0), "bits"),
        (dict(quant_type="int4"), "quant_type"), (dict(quant_type=None), "quant_type"),
        (dict(compute_dtype="float64"), "compute_dtype"),
    ],
    ll.DataSpec: [
        (dict(max_length=1), "max_length"), (dict(max_length=64.0), "max_length"),
        (dict(eval_fraction=1.0), "eval_fraction"), (dict(eval_fraction=-0.1), "eval_fraction"),
        (dict(template="no placeholder"), "template"), (dict(template=None), "template"),
        (dict(prompt_column=""), "prompt_column"), (dict(response_column=None), "response_column"),
        (dict(messages_column=3), "messages_column"),
    ],
    ll.TrainSpec: [
        (dict(steps=None, epochs=None), "steps"), (dict(steps=0), "steps"), (dict(steps=1.5), "steps"),
        (dict(steps=None, epochs=0), "epochs"), (dict(batch_size=0), "batch_size"),
        (dict(grad_accum=0), "grad_accum"), (dict(log_every=0), "log_every"),
        (dict(lr=5), "lr"), (dict(lr=0), "lr"), (dict(schedule="step"), "schedule"),
        (dict(warmup_steps=-1), "warmup_steps"), (dict(weight_decay=-0.1), "weight_decay"),
        (dict(max_grad_norm=0), "max_grad_norm"), (dict(eval_every=0), "eval_every"),
        (dict(save_every=1.5), "save_every"), (dict(optimizer="lion"), "optimizer"),
        (dict(precision="fp8"), "precision"), (dict(chunked_loss="yes"), "chunked_loss"),
        (dict(loss_chunk_size=0), "loss_chunk_size"), (dict(loss_chunk_size=2.5), "loss_chunk_size"),
        (dict(pad_to_multiple_of=0), "pad_to_multiple_of"),
        (dict(pad_to_multiple_of="8"), "pad_to_multiple_of"),
        (dict(compile="yes"), "compile"), (dict(compile=1), "compile"),
        (dict(autosave_minutes=0), "autosave_minutes"), (dict(autosave_minutes="10"), "autosave_minutes"),
        (dict(autosave_minutes=True), "autosave_minutes"),
    ],
}
UNCHECKED = {   # any value is accepted: flags read for their truth, seeds, paths
    ll.AdapterSpec: set(),
    ll.QuantSpec: {"double_quant"},
    ll.DataSpec: {"train_on_responses_only", "packing", "use_chat_template", "seed"},
    ll.TrainSpec: {"seed", "gradient_checkpointing", "output_dir"},
}
CASES = [pytest.param(cls, kw, field, id=f"{cls.__name__}-{field}-{kw[field]!r}")
         for cls, rows in BAD.items() for kw, field in rows]


@pytest.mark.parametrize("cls, kwargs, field", CASES)
def test_every_field_error_names_the_field_the_value_and_a_fix(cls, kwargs, field):
    with pytest.raises(SpecError) as e:
        cls(**kwargs)
    err = e.value
    assert err.field == field and err.spec == cls.__name__
    assert isinstance(err, LoraLabError) and isinstance(err, ValueError)
    msg = str(err)
    assert f"{cls.__name__}.{field} = {kwargs[field]!r}" in msg, msg
    assert isinstance(err.fix, str) and err.fix.strip(), f"no fix in: {msg}"
    assert f"\n  Fix: {err.fix}" in msg, msg


@pytest.mark.parametrize("cls", list(BAD))
def test_every_field_of_every_spec_is_covered(cls):
    """A field is either validated (and has bad values above) or listed as unchecked."""
    fields = set(cls.__dataclass_fields__)
    covered = {f for _, f in BAD[cls]}
    assert covered | UNCHECKED[cls] == fields, sorted(fields ^ (covered | UNCHECKED[cls]))
    assert not covered & UNCHECKED[cls]


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
