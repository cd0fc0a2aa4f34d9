"""Adapters move both ways between lora_lab and plain peft with the same logits.

For LoRA, DoRA, rsLoRA, IA3, prefix and prompt tuning on the tiny Llama:

* ``ll.save_adapter`` → ``peft.PeftModel.from_pretrained`` (peft's own loader, no lora_lab code);
* ``get_peft_model`` + ``save_pretrained`` (peft's own writer, configs written here with peft's
  classes, not through ``ll.to_peft_config``) → ``ll.load_adapter``.

The oracle is the model that saved the adapter: its logits on fixed ids.  Every trainable tensor
is moved away from its init first (peft starts LoRA's B at zero and IA3's vectors at one, which
would make a lost tensor invisible); each case also checks that the adapter changes the logits.
"""

from __future__ import annotations

import peft
import pytest
import torch

import lora_lab as ll

IDS = torch.randint(4, 90, (2, 10), generator=torch.Generator().manual_seed(0))
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]

# name: (lora_lab spec, the same adapter as a plain peft config)
CASES = {
    "lora": (ll.AdapterSpec(r=4, alpha=8, target_modules="attention"),
             lambda: peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=QKVO)),
    "dora": (ll.AdapterSpec(r=4, alpha=8, target_modules="attention", use_dora=True),
             lambda: peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=QKVO,
                                     use_dora=True)),
    "rslora": (ll.AdapterSpec(r=4, alpha=8, target_modules="all-linear", use_rslora=True),
               lambda: peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                       target_modules="all-linear", use_rslora=True)),
    "ia3": (ll.AdapterSpec(method="ia3"),
            lambda: peft.IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                                   feedforward_modules=["down_proj"])),
    "prefix": (ll.AdapterSpec(method="prefix", num_virtual_tokens=4),
               lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)),
    "prompt": (ll.AdapterSpec(method="prompt", num_virtual_tokens=4),
               lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)),
}


def _base(model_dir):
    return ll.load_model(model_dir, device="cpu")[0]


def _randomize(model, seed: int) -> int:
    """Add N(0, 0.1²) noise to every trainable tensor, in name order; return how many tensors."""
    g = torch.Generator().manual_seed(seed)
    trainable = sorted((n, p) for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        for _, p in trainable:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return len(trainable)


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _check_same(got, want, plain):
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # not vacuous: the adapter moves the logits far more than the tolerance (prompt tuning's
    # logits also cover its virtual tokens: compare the real positions)
    diff = (want[:, -plain.shape[1]:] - plain).abs().max().item()
    assert diff > 1e-2, f"the adapter changes the logits by only {diff}"


@pytest.mark.parametrize("case", list(CASES))
def test_lora_lab_save_loads_in_plain_peft(tiny_llama_dir, tmp_path, case, one_thread):
    spec, _ = CASES[case]
    plain = _logits(_base(tiny_llama_dir))
    model = ll.attach(_base(tiny_llama_dir), spec)
    assert _randomize(model, seed=1) > 0
    want = _logits(model)
    path = ll.save_adapter(model, tmp_path / case)
    loaded = peft.PeftModel.from_pretrained(_base(tiny_llama_dir), str(path))
    assert type(loaded.peft_config["default"]).__name__ == type(CASES[case][1]()).__name__
    _check_same(_logits(loaded), want, plain)


@pytest.mark.parametrize("case", list(CASES))
def test_plain_peft_save_loads_in_lora_lab(tiny_llama_dir, tmp_path, case, one_thread):
    _, config = CASES[case]
    plain = _logits(_base(tiny_llama_dir))
    model = peft.get_peft_model(_base(tiny_llama_dir), config())
    assert _randomize(model, seed=2) > 0
    want = _logits(model)
    model.save_pretrained(str(tmp_path / f"peft_{case}"), safe_serialization=True)
    loaded = ll.load_adapter(_base(tiny_llama_dir), tmp_path / f"peft_{case}")
    assert ll.active_adapter(loaded) == f"peft_{case}"
    _check_same(_logits(loaded), want, plain)
    # the spec lora_lab reads back from peft's config names the same method
    assert loaded.lora_lab_specs[f"peft_{case}"].method == CASES[case][0].method


@pytest.mark.parametrize("case", ["lora", "rslora"])
def test_plain_peft_save_loads_as_a_second_adapter(tiny_llama_dir, tmp_path, case, one_thread):
    """Onto a model that already has a LoRA on every linear layer, ``ll.load_adapter`` takes its
    own fast path (not peft's loader): still the logits of the model that saved it."""
    from lora_lab.hf.adapters import io as adapter_io

    _, config = CASES[case]
    model = peft.get_peft_model(_base(tiny_llama_dir), config())
    _randomize(model, seed=3)
    want = _logits(model)
    model.save_pretrained(str(tmp_path / "second"), safe_serialization=True)
    first = ll.attach(_base(tiny_llama_dir), ll.AdapterSpec(r=2, target_modules="all-linear"),
                      name="first")
    _randomize(first, seed=4)
    fast = adapter_io._LOAD_PATHS["fast"]
    loaded = ll.load_adapter(first, tmp_path / "second")
    assert adapter_io._LOAD_PATHS["fast"] == fast + 1
    assert ll.active_adapter(loaded) == "second"
    torch.testing.assert_close(_logits(loaded), want, rtol=1e-5, atol=1e-5)
