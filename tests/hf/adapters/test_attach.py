"""attach: validation against the model, every method attaches and runs, QLoRA trains, and names
peft cannot store are refused."""

import pytest
import torch
from lora_testing import IDS

import lora_lab as ll
from lora_lab.errors import AdapterError, LoraLabError, TargetModuleError


def test_attach_validates_against_the_model(tiny_llama):
    model, _ = tiny_llama
    with pytest.raises(TargetModuleError, match=r"(?s)does not have.*q_proj"):
        ll.attach(model, ll.AdapterSpec(target_modules=("query_key_value",)))
    with pytest.raises(TargetModuleError, match=r"r <= 32"):
        ll.attach(model, ll.AdapterSpec(r=33, target_modules="attention-qv"))
    with pytest.raises(TargetModuleError, match=r"layers \[7\]"):
        ll.attach(model, ll.AdapterSpec(layers=(7,)))
    pm = ll.attach(model, ll.AdapterSpec(r=2))
    with pytest.raises(AdapterError, match="already has an adapter"):
        ll.attach(pm, ll.AdapterSpec(r=2))
    with pytest.raises(LoraLabError, match="cannot share"):
        ll.attach(pm, ll.AdapterSpec(method="prompt"), name="soft")


@pytest.mark.parametrize("spec", [ll.AdapterSpec(method="prefix", num_virtual_tokens=4),
                                  ll.AdapterSpec(method="prompt", num_virtual_tokens=4),
                                  ll.AdapterSpec(method="ia3"),
                                  ll.AdapterSpec(r=2, use_dora=True)])
def test_other_methods_attach_and_run(tiny_llama, spec):
    model, _ = tiny_llama
    pm = ll.attach(model, spec)
    c = ll.count_parameters(pm)
    assert 0 < c.trainable < c.total
    out = pm(input_ids=IDS, labels=IDS)
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for p in pm.parameters() if p.requires_grad)


def test_qlora_nf4_trains_and_loss_falls(tiny_llama_nf4):
    import bitsandbytes as bnb

    model, _ = tiny_llama_nf4
    linears = list(ll.inspect_model(model)["name"])          # before peft wraps anything
    pm = ll.attach(model, ll.AdapterSpec(r=8))

    assert not pm.is_gradient_checkpointing  # a visible choice, off unless asked for
    # every adaptable linear (inspect_model's rows: 7 per decoder layer) sits on a frozen
    # bitsandbytes Linear4bit under its LoRA wrapper; nothing else is 4-bit: the LM head stays a
    # frozen full-precision nn.Linear and the LoRA factors are trainable fp32 nn.Linear
    want = {f"base_model.model.{n}.base_layer" for n in linears}
    assert len(want) == 7 * model.config.num_hidden_layers
    four_bit = {n for n, m in pm.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert four_bit == want
    assert all(not p.requires_grad for n, m in pm.named_modules() if n in four_bit
               for p in m.parameters())
    head = pm.base_model.model.lm_head
    assert type(head) is torch.nn.Linear and head.weight.dtype == torch.float32
    assert not head.weight.requires_grad
    lora = {n: m for n, m in pm.named_modules() if ".lora_A." in n or ".lora_B." in n}
    assert len(lora) == 2 * len(want)
    assert all(type(m) is torch.nn.Linear and m.weight.requires_grad
               and m.weight.dtype == torch.float32 for m in lora.values())
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(4, 90, (4, 16), generator=torch.Generator().manual_seed(3))
    pm.train()
    losses = []
    for _ in range(5):
        loss = pm(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize("name", ["half", "train", "keys", "a.b", ""])
def test_adapter_names_peft_cannot_store_are_refused_with_a_fix(tiny_llama, name):
    model, _ = tiny_llama
    with pytest.raises(AdapterError, match="Fix: pass a short name"):
        ll.attach(model, ll.AdapterSpec(r=2), name=name)
    pm = ll.attach(model, ll.AdapterSpec(r=2), name="ok")  # the model is still usable
    assert ll.active_adapter(pm) == "ok"
