"""The memory planner on a CPU follows the same bf16 rule as training and loading (issue 22):
``estimate_memory(..., device="cpu")`` with ``precision="auto"`` plans bf16 where
``hf.model.device.default_train_precision`` (the rule's own function) says bf16, fp32 elsewhere."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

import lora_lab as ll
from lora_lab.hf.model import device as dev


def _config(hidden: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("native", [True, False], ids=["bf16 CPU", "rule off"])
@pytest.mark.parametrize("hidden", [64, 576])
def test_auto_on_the_cpu_plans_what_the_rule_picks(monkeypatch, native, hidden):
    monkeypatch.setattr(dev, "cpu_bf16_native", lambda: native)
    want = dev.default_train_precision("cpu", hidden)
    assert want == ("bf16" if native and hidden >= dev.CPU_BF16_MIN_HIDDEN else "fp32")
    est = ll.estimate_memory(_config(hidden), ll.AdapterSpec(r=4), device="cpu")
    assert est.precision == want
    # the frozen base is planned in that dtype: 2 or 4 bytes per weight, as load_model(dtype="auto")
    # stores it (oracle: torch's element sizes)
    size = {"bf16": torch.bfloat16, "fp32": torch.float32}[want].itemsize
    assert est.breakdown["base_weights"] == size * est.total_params
    full = ll.estimate_memory(_config(hidden), None, device="cpu")
    assert full.precision == want and full.recipe.compute == want


def test_this_machine_and_explicit_choices(monkeypatch):
    est = ll.estimate_memory(_config(576), ll.AdapterSpec(r=4), device="cpu")
    assert est.precision == dev.default_train_precision("cpu", 576)   # whatever this CPU has
    monkeypatch.setattr(dev, "cpu_bf16_native", lambda: True)
    assert ll.estimate_memory(_config(576), ll.AdapterSpec(r=4), device="cpu",
                              precision="fp32").precision == "fp32"
    q = ll.QuantSpec(compute_dtype="float32")
    assert ll.estimate_memory(_config(576), ll.AdapterSpec(r=4), quant=q, device="cpu").precision == "fp32"
    assert ll.estimate_memory(_config(576), ll.AdapterSpec(r=4), device="T4").precision == "fp16"
