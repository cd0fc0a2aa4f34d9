"""AdapterDesigner: outputs follow the controls, bad choices show a message, code() reproduces."""

import pytest

import lora_lab as ll
from lora_lab.ui.designer import AdapterDesigner


@pytest.fixture
def designer(tiny_llama_dir):
    return AdapterDesigner(str(tiny_llama_dir))


def _y(d, name):
    return [list(t.y) for t in d.live.figure.data if t.name == name][0]


def test_outputs_change_with_the_controls(designer):
    d = designer
    assert d.error == "" and d.spec == ll.AdapterSpec(r=8, alpha=16.0)
    summary, adapter = d.summary.value, _y(d, "adapter weights")
    d.r.value = 16
    assert d.spec.r == 16 and d.summary.value != summary and _y(d, "adapter weights") != adapter
    acts = _y(d, "activations")
    d.seq_len.value = 2048
    assert _y(d, "activations") > acts
    d.checkpointing.value = False
    assert _y(d, "activations")[1] > d.estimate.scenarios["LoRA"]["activations"] / 2**30 / 2
    d.device.value = "A100-80GB"
    assert _y(d, "A100-80GB (80 GiB)") == [80.0, 80.0, 80.0]
    d.optimizer.value = "adamw_8bit"
    assert d.estimate.optimizer == "adamw_8bit"
    d.method.value = "QLoRA"                          # picks NF4 when no quantization is set
    assert d.quant == ll.QuantSpec() and d.estimate.chosen == "QLoRA"
    d.double_quant.value = False
    assert d.quant.double_quant is False


def test_presets_layers_and_scaling_note(designer):
    d = designer
    d.apply_preset("attention q+v")
    assert d.spec.target_modules == ("q_proj", "v_proj")
    d.apply_preset("all attention")
    assert set(d.spec.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    d.apply_preset("all linear")
    assert d.spec.target_modules == "all-linear"
    n_all = d.estimate.trainable["LoRA"]
    assert d.layers.disabled
    d.all_layers.value = False
    assert not d.layers.disabled
    d.layers.value = (1,)
    assert d.spec.layers == (1,) and d.estimate.trainable["LoRA"] == n_all // 2
    assert "α/r" in d.scaling_note.value
    d.method.value = "rsLoRA"
    assert d.spec.use_rslora and "α/√r" in d.scaling_note.value
    d.method.value = "prompt"
    d.virtual_tokens.value = 7
    assert d.spec == ll.AdapterSpec(method="prompt", num_virtual_tokens=7)


@pytest.mark.parametrize("change, words", [
    (("r", 0), "r must be an integer >= 1"),
    (("r", 10_000), "r <="),
    (("alpha", -1.0), "alpha"),
    (("dropout", 1.5), "dropout"),
    (("batch", 0), "batch_size"),
])
def test_invalid_choices_show_a_message(designer, change, words):
    d = designer
    good = d.spec
    setattr(getattr(d, change[0]), "value", change[1])   # no exception escapes
    assert words in d.error and words.split()[0] in d.message.value
    assert d.spec == good                                  # the last valid choice is kept
    setattr(getattr(d, change[0]), "value", {"r": 8, "alpha": 16.0, "dropout": 0.0,
                                              "batch": 1}[change[0]])
    assert d.error == "" and d.message.value == ""


def test_refusals_that_need_the_model_or_the_base(designer):
    d = designer
    d.method.value = "QLoRA"
    d.quantization.value = "none"                          # QLoRA without a 4-bit base
    assert "4-bit" in d.error
    d.quantization.value = "nf4"
    d.method.value = "LoRA"
    d.init.value = "pissa"                                 # attach() refuses this on 4-bit
    assert "pissa" in d.error
    d.quantization.value = "none"
    assert d.error == "" and d.spec.init == "pissa"
    d.method.value = "prompt"
    assert d.r.disabled and not d.virtual_tokens.disabled


def test_no_targets_and_no_layers_are_messages(designer):
    d = designer
    with d.hold():
        for box in d.targets.values():
            box.value = False
    assert "target_modules" in d.error
    d.apply_preset("all linear")
    d.all_layers.value = False
    d.layers.value = ()
    assert "layers" in d.error


def test_code_reproduces_the_spec_in_a_fresh_namespace(designer):
    d = designer
    d.apply_preset("attention q+v")
    d.r.value, d.alpha.value, d.dropout.value = 4, 8.0, 0.05
    d.method.value = "DoRA"
    d.quantization.value = "nf4"
    d.batch.value, d.seq_len.value = 2, 256
    ns = {}
    exec(d.code(), ns)
    assert ns["spec"] == d.spec and ns["quant"] == d.quant
    assert ns["estimate"].need() == d.estimate.need()


def test_works_on_a_config_alone(tiny_llama_dir):
    from transformers import AutoConfig

    d = AdapterDesigner(AutoConfig.from_pretrained(tiny_llama_dir), static=True)
    assert d.error == "" and len(d.live.figure.data) == 10
    ns = {}
    exec(d.code(), ns)                                     # estimate line is a comment here
    assert ns["spec"] == d.spec and ns["quant"] is None
