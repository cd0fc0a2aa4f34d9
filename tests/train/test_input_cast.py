"""peft's cast of each adapter input to fp32, skipped under autocast (hf/_peft.py InputCastOff).

Oracle: peft's own forward with the cast on.  Under a 16-bit autocast the cast is a round trip
(bf16 → fp32 → bf16 is exact), so the loss and every gradient must be bit-identical without it;
without autocast the cast is needed and the loop must leave it on.
"""

from __future__ import annotations

import pytest
import torch
from conftest import attach_lora, token_rows

import lora_lab as ll
from lora_lab.hf._peft import InputCastOff, tuner_layers
from lora_lab.train.loop import train


def _loss_and_grads(model, ids):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("spec_kw", [dict(r=8), dict(r=8, dropout=0.1)])
def test_under_bf16_autocast_skipping_the_cast_changes_no_bit(tiny_llama, spec_kw):
    """Without dropout bit for bit; with dropout its mask is applied in bf16 instead of fp32, so
    equal within bf16's rounding (eps 2⁻⁷)."""
    model, _ = tiny_llama
    torch.manual_seed(0)
    model = ll.attach(model.to(torch.bfloat16), ll.AdapterSpec(**spec_kw)).train()
    ids = torch.randint(4, 60, (2, 24))
    layers = tuner_layers(model)
    assert layers and all(m.cast_input_dtype_enabled for m in layers)
    torch.manual_seed(1)                           # the same dropout masks on both sides
    ref_loss, ref = _loss_and_grads(model, ids)    # peft casting each input to fp32
    torch.manual_seed(1)
    with InputCastOff(layers):
        loss, grads = _loss_and_grads(model, ids)
    assert all(m.cast_input_dtype_enabled for m in layers)  # restored
    assert ref.keys() == grads.keys()
    if not spec_kw.get("dropout"):
        assert torch.equal(loss, ref_loss) and all(torch.equal(ref[n], grads[n]) for n in ref)
    rel = max(float((ref[n] - grads[n]).norm() / ref[n].norm()) for n in ref if ref[n].norm() > 0)
    assert float(loss) == pytest.approx(float(ref_loss), rel=2**-8) and rel < 2**-6, rel


def test_dora_layers_keep_the_cast(tiny_llama):
    """DoRA's weight norm reads the fp32 input: skipping the cast moved its gradients by up to 13%
    on this model, so its layers are not listed and keep peft's cast."""
    model, _ = tiny_llama
    model = ll.attach(model, ll.AdapterSpec(r=4, use_dora=True))
    assert tuner_layers(model) == []


@pytest.mark.parametrize("precision, cast_during", [("bf16", False), ("fp32", True)])
def test_the_loop_skips_the_cast_only_under_autocast(tiny_llama, tmp_path, precision, cast_during, bf16_path):
    model, tok = tiny_llama
    model = attach_lora(model)
    seen = []
    layer = tuner_layers(model)[0]
    handle = layer.register_forward_pre_hook(lambda m, a: seen.append(m.cast_input_dtype_enabled))
    train(model, tok, token_rows(tok, 8), spec=ll.TrainSpec(steps=2, batch_size=4, precision=precision,
                                                           output_dir=str(tmp_path / "run")))
    handle.remove()
    assert seen and set(seen) == {cast_during}
    assert all(m.cast_input_dtype_enabled for m in tuner_layers(model))  # as the user had it
