"""``lora_lab.set_adapter`` (issue 16, bug 3): one fast path under both names, and after every
switch the model is in the state peft's own path leaves: the same active adapter and disabled flag
on every adapter layer, the same ``requires_grad`` on every parameter, the same outputs.

The oracle is peft itself, on a deep copy of the same model: ``model.set_adapter(name)`` after
``model.base_model.enable_adapter_layers()``, and ``model.base_model.disable_adapter_layers()`` for
None (peft's ``set_adapter`` alone does not undo ``disable_adapter_layers()``)."""

from __future__ import annotations

import copy

import pytest
import torch
from lora_testing import randomize_lora
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer

import lora_lab as ll
from lora_lab.errors import AdapterError
from lora_lab.hf.adapters.switch import merged_adapters

IDS = torch.randint(4, 90, (2, 10), generator=torch.Generator().manual_seed(0))
pytestmark = pytest.mark.usefixtures("one_thread")


def peft_switch(model, name):
    """peft's own way to the state ``lora_lab.set_adapter(model, name)`` promises."""
    if name is None:
        model.base_model.disable_adapter_layers()
    else:
        model.base_model.enable_adapter_layers()
        model.set_adapter(name)


def state(model):
    """Everything a switch decides: per adapter layer its active adapters and disabled flag, every
    parameter's requires_grad, the active adapter names, and the logits."""
    layers = {n: (tuple(m.active_adapters), m.disable_adapters)
              for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    model.eval()
    with torch.no_grad():
        out = model(input_ids=IDS).logits
    return layers, grads, (model.active_adapter, model.base_model.active_adapter), out


def assert_same(ours, ref):
    a, b = state(ours), state(ref)
    assert a[0] == b[0]                                    # routing of every layer
    assert a[1] == b[1]                                    # requires_grad of every parameter
    assert a[2] == b[2]
    assert torch.equal(a[3], b[3])


@pytest.fixture
def three():
    """builtin:tiny with three LoRA adapters on different layers (B random, so each changes the
    outputs): x1 on every linear layer, x2 on the MLP, x3 on q and v only."""
    model, _ = ll.load_model("builtin:tiny", device="cpu")
    pm = ll.attach(model, ll.AdapterSpec(r=4), name="x1")
    pm = ll.attach(pm, ll.AdapterSpec(r=2, target_modules="mlp"), name="x2")
    pm = ll.attach(pm, ll.AdapterSpec(r=2, target_modules=("q_proj", "v_proj")), name="x3")
    for i, n in enumerate(("x1", "x2", "x3")):
        randomize_lora(pm, n, seed=i + 1)
    return pm


def test_set_adapter_and_switch_adapter_are_one_function():
    from lora_lab.hf.adapters import switch

    assert ll.set_adapter is ll.switch_adapter is switch.set_adapter is switch.switch_adapter


def test_every_switch_leaves_the_state_peft_leaves(three):
    ours, ref = three, copy.deepcopy(three)
    outs = {}
    for name in ("x2", "x3", None, "x1", "x1", None, None, "x3", "x2", None, "x1"):
        ll.set_adapter(ours, name)
        peft_switch(ref, name)
        assert_same(ours, ref)
        assert ll.active_adapter(ours) == name
        outs.setdefault(name, state(ours)[3])
    assert len({tuple(o.flatten()[:50].tolist()) for o in outs.values()}) == 4   # all different
    with ll.disabled_adapters(three):                     # None is exactly the base
        assert torch.equal(state(three)[3], outs[None])


def test_peft_calls_in_between_are_picked_up(three):
    """peft's own switches and flag changes between two of ours: the next switch still ends in
    peft's state (lora_lab re-reads every flag when peft moved the routing or a whole adapter)."""
    ours, ref = three, copy.deepcopy(three)
    ll.set_adapter(ours, "x1")
    peft_switch(ref, "x1")
    for m in (ours, ref):
        m.set_adapter("x3")                               # peft's own switch
    ll.set_adapter(ours, "x2")
    peft_switch(ref, "x2")
    assert_same(ours, ref)
    for m in (ours, ref):
        m.base_model.set_requires_grad("x3", True)        # a whole adapter made trainable
    ll.set_adapter(ours, "x1")
    peft_switch(ref, "x1")
    assert_same(ours, ref)
    for m in (ours, ref):
        with m.disable_adapter():                         # peft's context: disables, re-enables
            pass
    ll.set_adapter(ours, "x3")
    peft_switch(ref, "x3")
    assert_same(ours, ref)
    for m in (ours, ref):
        m.requires_grad_(False)                           # everything frozen by hand
    ll.set_adapter(ours, "x2")
    peft_switch(ref, "x2")
    assert_same(ours, ref)


def test_set_adapter_undoes_peft_disable_adapter_layers(three):
    """Switched off through peft directly (not through lora_lab): naming an adapter switches the
    layers back on, as peft's enable_adapter_layers + set_adapter do."""
    ours, ref = three, copy.deepcopy(three)
    for m in (ours, ref):
        m.set_adapter("x1")
        m.base_model.disable_adapter_layers()
    ll.set_adapter(ours, "x2")
    peft_switch(ref, "x2")
    assert_same(ours, ref)
    assert not any(m.disable_adapters for m in ours.modules() if isinstance(m, BaseTunerLayer))


def test_a_variant_with_frozen_weights_keeps_them_frozen(three):
    """MiCA (peft's init_lora_weights="mica") trains A only: peft keeps its B frozen whichever
    adapter is active; so does lora_lab's switch."""
    three.add_adapter("mica", LoraConfig(r=2, target_modules=["up_proj"], init_lora_weights="mica"))
    ours, ref = three, copy.deepcopy(three)
    for name in ("mica", "x1", None, "mica", "x2", "mica"):
        ll.set_adapter(ours, name)
        peft_switch(ref, name)
        assert_same(ours, ref)
    grads = state(ours)[1]
    assert any(g for n, g in grads.items() if ".lora_A.mica." in n)
    assert not any(g for n, g in grads.items() if ".lora_B.mica." in n)


def test_merged_layers_take_peft_path_and_end_unmerged(three):
    ours, ref = three, copy.deepcopy(three)
    for m in (ours, ref):
        m.set_adapter("x2")
        m.base_model.merge_adapter(["x2"])
    with pytest.warns(UserWarning, match="merged"):
        ll.set_adapter(ours, "x1")
    with pytest.warns(UserWarning, match="merged"):
        peft_switch(ref, "x1")
    a, b = state(ours), state(ref)
    assert a[:3] == b[:3] and not merged_adapters(ours)
    torch.testing.assert_close(a[3], b[3])


def test_bad_names_are_refused_with_the_fix(three):
    with pytest.raises(AdapterError, match=r"(?s)no adapter named 'x9'.*None for the base"):
        ll.set_adapter(three, "x9")
    plain, _ = ll.load_model("builtin:tiny", device="cpu")
    ll.set_adapter(plain, None)                            # a plain model is the base already
    with pytest.raises(AdapterError, match="load_adapter"):
        ll.set_adapter(plain, "x1")
