"""The merge checks compare against the unmerged model *with the adapter being merged switched on*
(issue 16, bug 2): peft's ``set_adapter`` does not undo ``disable_adapter_layers()``, so a reference
taken after ``set_adapter(model, None)`` used to be the base model, and a correct merge was reported
as 0.18-0.28 off.

Oracles from peft: the logits of a deep copy with peft's own ``enable_adapter_layers()`` +
``set_adapter(name)``, and W' = W + s·B·A for the merged weight."""

from __future__ import annotations

import copy

import pytest
import torch
from lora_testing import randomize_lora

import lora_lab as ll
from lora_lab.errors import MergeError
from lora_lab.hf.adapters.merge import make_probe_ids, merge_checked, probe_logits
from lora_lab.hf.adapters.switch import merged_adapters

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def two():
    """builtin:tiny with adapters "first" (all linear) and "second" (MLP), B random; "first" active."""
    model, _ = ll.load_model("builtin:tiny", device="cpu")
    pm = ll.attach(model, ll.AdapterSpec(r=4, alpha=8), name="first")
    pm = ll.attach(pm, ll.AdapterSpec(r=2, target_modules="mlp"), name="second")
    randomize_lora(pm, "first", seed=1)
    randomize_lora(pm, "second", seed=2)
    ll.set_adapter(pm, "first")
    return pm


def peft_logits(model, name, ids):
    """The unmerged model with adapter ``name`` on, by peft alone, on a copy."""
    ref = copy.deepcopy(model)
    ref.base_model.enable_adapter_layers()
    ref.set_adapter(name)
    return probe_logits(ref, ids)


@pytest.mark.parametrize("before", [None, "first", "second"])
def test_merged_copy_reference_has_the_named_adapter_on(two, before):
    ids = make_probe_ids(two)
    want = peft_logits(two, "first", ids)
    ll.set_adapter(two, before)
    base_or_b = probe_logits(two, ids)
    merged, report = ll.merged_copy(two, "first", probe_ids=ids)
    assert report.adapter == "first" and report.rel_logit_diff < 1e-5       # a correct merge: ~1e-7
    torch.testing.assert_close(probe_logits(merged, ids), want, rtol=1e-4, atol=1e-4)
    # the model is left as it was: the same adapter (or none) active, the same outputs
    assert ll.active_adapter(two) == before
    assert torch.equal(probe_logits(two, ids), base_or_b)


def test_merged_copy_without_a_name_when_switched_off_is_refused(two):
    ll.set_adapter(two, None)
    with pytest.raises(MergeError, match=r"(?s)switched off.*merged_copy\(model, 'name'\)"):
        ll.merged_copy(two)
    with pytest.raises(MergeError, match="no adapter named 'zz'"):
        ll.merged_copy(two, "zz")


@pytest.mark.parametrize("before", [None, "first"])
def test_merge_checked_merges_the_named_adapter_and_checks_it(two, before):
    """Merging "second" while "first" is active (or none is) used to be reported 0.28 off (the
    merged model added first's update on top), and while switched off peft undid the merge at the
    next forward."""
    ids = make_probe_ids(two, n=1, length=16)
    want = peft_logits(two, "second", ids)
    layer = two.base_model.model.model.layers[0].mlp.up_proj
    w = layer.base_layer.weight.detach().clone()
    delta = layer.scaling["second"] * layer.lora_B["second"].weight @ layer.lora_A["second"].weight
    ll.set_adapter(two, before)
    report, pre = merge_checked(two, "second", probe_ids=ids)
    assert report.adapter == "second" and report.rel_logit_diff < 1e-5
    torch.testing.assert_close(pre, want)
    assert merged_adapters(two) == ["second"] and ll.active_adapter(two) == "second"
    torch.testing.assert_close(layer.base_layer.weight, w + delta)      # W' = W + s·B·A, kept
    torch.testing.assert_close(probe_logits(two, ids), want, rtol=1e-4, atol=1e-4)
