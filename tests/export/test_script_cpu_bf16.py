"""The exported train.py picks its CPU dtype by lora_lab's rule (issue 22): bf16 where the chip has
native bf16 and the model is at least 512 wide, else fp32.  Oracle: lora_lab's own rule function
(``hf.model.device.auto_dtype``) answering for the same chip flags (both read torch's CPU
capability probes, which the test sets)."""

from __future__ import annotations

import importlib.util
import platform

import pytest
import torch
from transformers import LlamaConfig

import lora_lab as ll
from lora_lab.export.script import export_script
from lora_lab.hf.model import device as dev

pytestmark = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                                reason="the x86 probe is the one torch lets a test set")


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    out = export_script(ll.AdapterSpec(r=4), path=tmp_path_factory.mktemp("x"))
    spec = importlib.util.spec_from_file_location("exported_bf16", out.file("train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("hidden", [128, 576])
def test_cpu_dtype_is_lora_labs_rule(script, tmp_path, monkeypatch, native, hidden):
    LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2).save_pretrained(tmp_path)
    monkeypatch.setattr(script, "MODEL", str(tmp_path))
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    want = dev.auto_dtype("cpu", hidden)
    assert want == (torch.bfloat16 if native and hidden >= 512 else torch.float32)
    assert script.compute_dtype("cpu") == want
    assert script.mixed_precision("cpu") == (want == torch.bfloat16, False)
