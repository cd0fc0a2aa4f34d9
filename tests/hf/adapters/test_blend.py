"""Weighted blends: exact for 'cat', refused or caught when peft would get them wrong."""

import pytest
import torch

import lora_lab as ll
from lora_testing import randomize_lora_b
from lora_lab.errors import BlendError


def two_adapters(model, **spec_kw):
    pm = ll.attach(model, ll.AdapterSpec(r=4, **spec_kw), name="add")
    pm = ll.attach(pm, ll.AdapterSpec(r=2, **spec_kw), name="sub")
    return randomize_lora_b(pm, seed=0, scale=0.1)


def dense(model, adapter):
    return {f.name: f.delta() for f in ll.lora_factors(model, adapter)}


def test_cat_blend_is_the_weighted_sum(tiny_llama):
    pm = two_adapters(tiny_llama[0])
    rep = ll.blend_adapters(pm, {"add": 0.7, "sub": -0.3}, name="mix", combination="cat")
    assert rep.r == 6 and rep.self_check_error < 1e-5 and rep.sum_error < 1e-5
    a, s, m = dense(pm, "add"), dense(pm, "sub"), dense(pm, "mix")
    for k in m:
        torch.testing.assert_close(m[k], 0.7 * a[k] - 0.3 * s[k], rtol=1e-4, atol=1e-6)
    assert ll.active_adapter(pm) == "mix"


def test_linear_blend_of_one_adapter_reproduces_it(tiny_llama):
    pm = two_adapters(tiny_llama[0])
    ll.blend_adapters(pm, {"add": 1.0}, name="same", combination="linear")
    a, m = dense(pm, "add"), dense(pm, "same")
    for k in a:
        torch.testing.assert_close(m[k], a[k], rtol=1e-4, atol=1e-6)


def test_known_peft_bugs_are_refused(tiny_llama_dir):
    model, _ = ll.load_model(tiny_llama_dir)
    pm = two_adapters(model, use_rslora=True)
    with pytest.raises(BlendError, match="rsLoRA"):
        ll.blend_adapters(pm, {"add": 0.5, "sub": 0.5})
    model, _ = ll.load_model(tiny_llama_dir)
    with pytest.raises(BlendError, match="one rank"):
        ll.blend_adapters(two_adapters(model), {"add": 0.5, "sub": 0.5}, combination="linear")


def test_self_check_catches_a_wrong_blend(tiny_llama):
    # Without the up-front refusal, peft's rsLoRA blend scales by sqrt(r) instead of 1: the
    # self-check (one adapter at weight 1.0 must reproduce itself) has to catch it.
    pm = two_adapters(tiny_llama[0], use_rslora=True)
    with pytest.raises(BlendError, match="Self-check failed"):
        ll.blend_adapters(pm, {"add": 0.5, "sub": 0.5}, refuse_known_bugs=False)
    assert "blend" not in pm.peft_config and "__lora_lab_selfcheck" not in pm.peft_config


def test_bad_blend_inputs(tiny_llama):
    pm = two_adapters(tiny_llama[0])
    with pytest.raises(BlendError, match="unknown adapters"):
        ll.blend_adapters(pm, {"nope": 1.0})
    with pytest.raises(BlendError, match="not known"):
        ll.blend_adapters(pm, {"add": 1.0}, combination="average")
    with pytest.raises(BlendError, match="finite"):
        ll.blend_adapters(pm, {"add": float("nan")})
