"""Merging: the merged weight equals W + s·B·A, merged logits equal unmerged ones, 4-bit refused in place."""

import numpy as np
import pytest
import torch

import lora_lab as ll
from lora_lab.errors import MergeError
from lora_lab.hf.adapters.merge import (LogitGap, logit_gap, make_probe_ids, merge_checked,
                                         probe_logits)
from lora_lab.hf.adapters.switch import merged_adapters
from lora_testing import IDS, logits, randomize_lora


def test_merged_weight_equals_w_plus_sBA(tiny_llama):
    model, _ = tiny_llama
    W = model.model.layers[1].mlp.up_proj.weight.detach().clone()
    pm = ll.attach(model, ll.AdapterSpec(r=4, alpha=12))
    randomize_lora(pm, "default")
    f = next(x for x in ll.lora_factors(pm) if x.name == "model.layers.1.mlp.up_proj")
    assert f.scaling == 3.0 and f.A.shape == (4, W.shape[1]) and f.B.shape == (W.shape[0], 4)
    before = logits(pm)
    ll.merge_adapter(pm)
    merged = pm.base_model.model.model.layers[1].mlp.up_proj.base_layer.weight
    torch.testing.assert_close(merged, W + 3.0 * f.B @ f.A, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits(pm), before, rtol=1e-4, atol=1e-4)
    ll.unmerge_adapter(pm)
    torch.testing.assert_close(pm.base_model.model.model.layers[1].mlp.up_proj.base_layer.weight,
                               W, rtol=0, atol=1e-5)


def test_4bit_merge_in_place_is_refused_and_merged_copy_is_right(tiny_llama_dir, tiny_llama_nf4,
                                                                  tmp_path):
    model, _ = tiny_llama_nf4
    pm = ll.attach(model, ll.AdapterSpec(r=4))
    randomize_lora(pm, "default")
    with pytest.raises(MergeError, match="merged_copy"):
        ll.merge_adapter(pm)
    qlogits = logits(pm)
    merged, report = ll.merged_copy(pm, probe_ids=IDS)
    assert report.from_quantized and type(merged).__name__ == "LlamaForCausalLM"
    assert all(type(m).__name__ != "Linear4bit" for m in merged.modules())
    out = logits(merged)
    rel = float((out - qlogits).norm() / qlogits.norm())
    assert rel == pytest.approx(report.rel_logit_diff, rel=1e-4)
    assert 0 < rel < 0.3  # only the NF4 quantization gap separates them
    # oracle: the merged model equals the full-precision base carrying the same adapter, unmerged
    full, _ = ll.load_model(tiny_llama_dir)
    unmerged = ll.load_adapter(full, ll.save_adapter(pm, tmp_path / "q"))
    torch.testing.assert_close(out, logits(unmerged), rtol=1e-4, atol=1e-4)
    # the QLoRA model itself is untouched.  (bitsandbytes' CPU 4-bit kernels switch weight layout
    # between the first eval forward and a state_dict() call, which moves logits by ~1e-3 relative,
    # so this compares relatively rather than bit for bit.)
    after = logits(pm)
    assert float((after - qlogits).norm() / qlogits.norm()) < 5e-3


def test_merged_copy_full_precision_is_exact(tiny_llama):
    model, _ = tiny_llama
    pm = ll.attach(model, ll.AdapterSpec(r=4))
    randomize_lora(pm, "default")
    merged, report = ll.merged_copy(pm)
    assert report.rel_logit_diff < 1e-5 and not report.from_quantized
    torch.testing.assert_close(logits(merged), logits(pm), rtol=1e-4, atol=1e-4)


def test_logit_gap_is_the_documented_formulas():
    g = torch.Generator().manual_seed(0)
    ref, out = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    gap = logit_gap(ref, out)
    d = (out - ref).double().numpy()
    assert gap.max_abs == pytest.approx(np.abs(d).max())
    assert gap.mean_abs == pytest.approx(np.abs(d).mean())
    assert gap.rel == pytest.approx(np.linalg.norm(d) / np.linalg.norm(ref.double().numpy()))
    assert logit_gap(ref, ref.clone()) == LogitGap(0.0, 0.0, 0.0)


def test_probe_ids_avoid_special_ids_and_fit_the_context(tiny_llama):
    model, _ = tiny_llama
    ids = make_probe_ids(model, n=3, length=10 ** 6)
    assert ids.shape == (3, model.config.max_position_embeddings)
    assert int(ids.min()) >= 3 and int(ids.max()) < model.config.vocab_size
    assert torch.equal(make_probe_ids(model, 2, 8), make_probe_ids(model, 2, 8))


def test_merge_checked_reports_a_tiny_gap_and_unmerge_restores_the_logits(tiny_llama):
    model, _ = tiny_llama
    pm = ll.attach(model, ll.AdapterSpec(r=4, alpha=8))
    randomize_lora(pm, "default")
    ids = make_probe_ids(pm, n=1, length=16)
    before = probe_logits(pm, ids)
    with ll.disabled_adapters(pm):
        base = probe_logits(pm, ids)
    assert logit_gap(base, before).rel > 1e-3          # the adapter changes the logits
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    w = layer.base_layer.weight.detach().clone()
    delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    report, pre = merge_checked(pm)
    assert merged_adapters(pm) == ["default"]
    torch.testing.assert_close(layer.base_layer.weight, w + delta)   # W' = W + s·B·A, in place
    assert torch.equal(pre, before)
    assert report.adapter == "default" and not report.from_quantized
    assert report.rel_logit_diff < 1e-5                  # merged W + s·B·A computes the same logits
    ll.unmerge_adapter(pm)
    assert logit_gap(pre, probe_logits(pm, ids)).max_abs < 1e-4
