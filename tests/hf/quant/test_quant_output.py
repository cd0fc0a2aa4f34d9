"""Logit error of a (simulated) quantized model against full precision."""

from __future__ import annotations

import pytest
import torch

from lora_lab.errors import LoraLabError
from lora_lab.hf.quant.output import quantized_output_error


@pytest.fixture
def ids():
    return torch.randint(4, 100, (2, 24), generator=torch.Generator().manual_seed(0))


def test_whole_model_per_layer_and_weights_restored(tiny_llama, ids):
    model, _ = tiny_llama
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = quantized_output_error(model, ids, "nf4")
    assert out.tokens == 48 and out.kl > 0 and out.logits_mae > 0 and 0 < out.top1_agreement <= 1
    assert list(out.table.variant) == ["quantized", "layer 0", "layer 1"]
    # each layer alone perturbs less than all of them together
    assert (out.table.kl.iloc[1:] < out.kl).all()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training  # mode restored too
    assert "quantized" in repr(out)


def test_quantized_logits_match_a_real_bitsandbytes_model(tiny_llama, tiny_llama_nf4, ids):
    model, _ = tiny_llama
    qmodel, _ = tiny_llama_nf4
    sim = quantized_output_error(model, ids, "nf4", double_quant=True, per_layer=False)
    real = quantized_output_error(model, {"input_ids": ids}, "int8", per_layer=False)
    with torch.no_grad():
        z, zq = model(ids).logits, qmodel(ids).logits
    real_mae = (z - zq).abs().mean().item()
    assert sim.logits_mae == pytest.approx(real_mae, rel=0.02), (sim.logits_mae, real_mae)  # load_model's NF4 uses double quant
    assert real.logits_mae < sim.logits_mae  # 8-bit blockwise is far closer than NF4


def test_lowrank_and_loftq_rows_reduce_the_error(tiny_llama, ids):
    model, _ = tiny_llama
    out = quantized_output_error(model, ids, "nf4", per_layer=False, ranks=(16,), loftq_iters=2,
                                 scaling=2.0, max_batches=1)
    t = out.table.set_index("variant")
    assert list(t.index) == ["quantized", "svd r16", "loftq r16"]
    assert t.loc["loftq r16", "logits_mae"] < t.loc["svd r16", "logits_mae"] < out.logits_mae


def test_refuses_a_quantized_model_and_bad_data(tiny_llama_nf4, tiny_llama, ids):
    with pytest.raises(LoraLabError, match="full-precision"):
        quantized_output_error(tiny_llama_nf4[0], ids)
    with pytest.raises(LoraLabError, match="input_ids"):
        quantized_output_error(tiny_llama[0], ["not tokens"])
