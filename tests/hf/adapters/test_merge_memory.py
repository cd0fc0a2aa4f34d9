"""merged_copy refuses, before allocating, a copy that would not fit in the memory free where it
goes (a 7B QLoRA base reloads as 28 GB of fp32: an out-of-memory kill would take the kernel), and
says to stream the merge to disk with export_merged instead."""

from __future__ import annotations

import os

import pytest
import torch
from lora_testing import logits, randomize_lora

import lora_lab as ll
from lora_lab.errors import MergeError
from lora_lab.hf.adapters import merge
from lora_lab.hf.model import device as dev


def _bytes(model, buffers=True) -> int:
    seen, total = set(), 0
    for t in (*model.parameters(), *(model.buffers() if buffers else ())):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def test_the_planned_copy_is_what_merged_copy_allocates(tiny_llama, tiny_llama_nf4):
    """Oracle: the bytes of the model merged_copy returns (a deep copy where the model is; for a
    4-bit base, the fp32 reload, parameters only: its buffers are the rotary tables)."""
    model, _ = tiny_llama
    pm = ll.attach(model, ll.AdapterSpec(r=4))
    need, where = merge.copy_bytes(pm, quantized=False)
    assert where.type == "cpu" and need == _bytes(pm)   # what copy.deepcopy allocates, LoRA included
    q = ll.attach(tiny_llama_nf4[0], ll.AdapterSpec(r=4))
    need, where = merge.copy_bytes(q, quantized=True)
    merged, _ = ll.merged_copy(q)
    assert where.type == "cpu" and need == _bytes(merged, buffers=False)
    assert all(p.dtype == torch.float32 for p in merged.parameters())


def test_a_copy_that_does_not_fit_is_refused_and_the_model_is_untouched(tiny_llama, monkeypatch):
    model, _ = tiny_llama
    pm = ll.attach(model, ll.AdapterSpec(r=4))
    randomize_lora(pm, "default")
    before = logits(pm)
    need, _ = merge.copy_bytes(pm, quantized=False)
    monkeypatch.setattr(dev, "free_memory_bytes", lambda device="cpu": need - 1)
    with pytest.raises(MergeError, match="would copy the model on cpu") as err:
        ll.merged_copy(pm)
    assert "export_merged" in err.value.fix
    torch.testing.assert_close(logits(pm), before, rtol=0, atol=0)   # nothing merged, nothing changed
    monkeypatch.setattr(dev, "free_memory_bytes", lambda device="cpu": need)
    assert ll.merged_copy(pm)[1].rel_logit_diff < 1e-5


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc")
def test_free_cpu_memory_is_the_limit_less_this_process_anonymous_memory(monkeypatch):
    """Oracle: the kernel's own figures.  Under a limit (Binder's MEM_LIMIT) of this process's
    anonymous memory + 100 MB, about 100 MB are free (the process allocates a little in between)."""
    def anon() -> int:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("RssAnon:"))

    with open("/proc/meminfo") as fh:
        available = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:"))
    assert 0 < dev.free_memory_bytes("cpu") <= available * 1.05
    monkeypatch.setenv("MEM_LIMIT", str(anon() + 100_000_000))
    assert abs(dev.free_memory_bytes("cpu") - 100_000_000) < 20_000_000
    monkeypatch.setenv("MEM_LIMIT", str(anon() // 2))
    assert dev.free_memory_bytes("cpu") == 0
