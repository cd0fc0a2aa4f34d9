"""4-bit layers stay exact on CPU: eval forwards equal training forwards bit for bit, and a
repacking that happened before lora_lab saw the model is undone, scale layout included."""

import pytest
import torch

import lora_lab as ll
from lora_lab.hf.model.kbit import unpack_4bit_weights


def _logits(model, ids, training):
    model.train(training)
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture
def ids(tiny_llama):
    vocab = tiny_llama[0].config.vocab_size
    return torch.randint(3, vocab, (2, 16), generator=torch.Generator().manual_seed(0))


def _layers(model):
    """bitsandbytes' 4-bit layers (not peft's LoRA wrappers, whose class has the same name)."""
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def _packed(layers) -> int:
    return sum(bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False)) for m in layers)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dora", [False, True])
def test_eval_forward_equals_training_forward(tiny_llama_dir, ids, double_quant, dora, one_thread):
    model, _ = ll.load_model(tiny_llama_dir, quant=ll.QuantSpec(double_quant=double_quant),
                             device="cpu")
    model = ll.attach(model, ll.AdapterSpec(r=4, use_dora=dora))
    layers = _layers(model)
    # what keeps it exact, whatever the CPU: the repacking is switched off on every 4-bit layer
    assert len(layers) == 14 and not any(m.support_avx512bf16_for_cpu for m in layers)
    ref = _logits(model, ids, training=True)
    assert torch.equal(_logits(model, ids, training=False), ref)
    assert _packed(layers) == 0                                   # the eval forward kept the layout
    assert torch.equal(_logits(model, ids, training=True), ref)  # and nothing changed on the way


def _repack_as_bitsandbytes_does(layers) -> None:
    """What ``Linear4bit.forward`` does to each layer on its first eval forward on a CPU with
    AVX512-BF16 (bitsandbytes 0.50, ``nn/modules.py``), called directly so that it happens on
    every CPU: the layout under test does not depend on the CPU's flags."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    for m in layers:
        m.weight.data, state = _convert_weight_packed_for_cpu(m.weight.data, m.weight.quant_state)
        assert state is m.weight.quant_state                      # changed in place, as in forward


@pytest.mark.parametrize("double_quant", [True, False])
def test_unpack_undoes_a_repacking_done_outside(tiny_llama_dir, ids, double_quant, one_thread):
    import bitsandbytes.functional as F

    model, _ = ll.load_model(tiny_llama_dir, quant=ll.QuantSpec(double_quant=double_quant),
                             device="cpu")
    layers = _layers(model)
    codes = [m.weight.data.clone() for m in layers]
    weights = [F.dequantize_4bit(m.weight.data, m.weight.quant_state) for m in layers]
    ref = _logits(model, ids, training=True)
    _repack_as_bitsandbytes_does(layers)
    assert _packed(layers) == len(layers) == 14
    assert unpack_4bit_weights(model) == len(layers)
    assert _packed(layers) == 0
    for m, c, w in zip(layers, codes, weights):
        assert torch.equal(m.weight.data, c)                      # the 4-bit codes come back exactly
        assert m.weight.quant_state.nested == double_quant
        # the scales went through bf16 (2⁻⁸ relative rounding), and with double quantization
        # through 8 bits again: measured at most 2.1e-3 (nested) and 1.6e-3 relative per weight
        back = F.dequantize_4bit(m.weight.data, m.weight.quant_state)
        assert _rel(back, w) < 1e-2, _rel(back, w)
    # the packed layout keeps bf16 block scales: ~4e-3 remains (without the scale fix: 0.74)
    assert _rel(_logits(model, ids, training=True), ref) < 2e-2
    # and it does not repack again: the switch is off on every layer, whatever the CPU
    assert not any(m.support_avx512bf16_for_cpu for m in layers)
    _logits(model, ids, training=False)
    assert _packed(layers) == 0


def test_bitsandbytes_repacks_in_eval_forwards_exactly_when_the_cpu_has_avx512_bf16(tiny_llama_dir, ids,
                                                                                    one_thread):
    """The path above as bitsandbytes takes it by itself (a model loaded with plain transformers):
    a repacking happens exactly on CPUs with AVX512-BF16, and is then undone.  On other CPUs nothing
    is packed and nothing is undone, which is asserted rather than skipped."""
    from bitsandbytes.functional import has_avx512bf16

    model, _ = ll.load_model(tiny_llama_dir, quant="nf4", device="cpu")
    layers = _layers(model)
    for m in layers:  # what bitsandbytes' Linear4bit.__init__ sets, which load_model turned off
        m.support_avx512bf16_for_cpu = has_avx512bf16()
    ref = _logits(model, ids, training=True)
    _logits(model, ids, training=False)
    expected = len(layers) if has_avx512bf16() else 0
    assert _packed(layers) == expected
    assert unpack_4bit_weights(model) == expected and _packed(layers) == 0
    assert _rel(_logits(model, ids, training=True), ref) < 2e-2
