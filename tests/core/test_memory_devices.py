"""core.memory (issue 16): device names and units, the CPU, gradients at the peak, MiB labels."""

import pytest

from lora_lab.core import memory as mem

ARCH = mem.Architecture(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, head_dim=16,
                        vocab=100)


def test_device_bytes_names_numbers_and_the_cpu():
    assert mem.device_bytes("t4") == ("T4", 16 * 2**30)
    assert mem.device_bytes(24) == ("24 GiB", 24 * 2**30)           # a number is GiB
    assert mem.device_bytes(1.5) == ("1.5 GiB", int(1.5 * 2**30))
    assert mem.device_bytes("cpu", system_ram=8 * 10**9) == (mem.CPU, 8 * 10**9)
    with pytest.raises(ValueError, match="system_ram"):
        mem.device_bytes("cpu")
    with pytest.raises(ValueError, match="GiB"):
        mem.device_bytes(0)


def test_an_ambiguous_name_lists_its_choices():
    with pytest.raises(ValueError) as info:
        mem.device_bytes("A100")
    assert "ambiguous" in str(info.value)
    assert all(c in str(info.value) for c in mem.AMBIGUOUS_DEVICES["A100"])
    assert set(mem.AMBIGUOUS_DEVICES["A100"]) <= set(mem.DEVICES)


def test_gradients_at_the_peak_and_with_accumulation():
    """Full FT, 2 bytes/param.  Forward-bound peak: no gradient yet; with grad_accum > 1 the
    gradients of the earlier micro-batches are held through the next forward pass."""
    full = mem.TrainableLayout(params=10_000, param_bytes=2, full=True)
    kw = {"arch": ARCH, "total_params": 10_000, "unquantized_params": 10_000, "trainable": full,
              "batch": 4, "seq": 64, "checkpointing": False, "compute_bytes": 2, "padded": False}
    one = mem.memory_terms(**kw)
    assert one["gradients"] == 0 and one["gradients_total"] == 20_000
    assert one["optimizer_states"] == 2 * 2 * 10_000                  # two moments, param dtype
    two = mem.memory_terms(**kw, grad_accum=2)
    assert two["gradients"] == 20_000
    assert (two["activations"], two["logits"]) == (one["activations"], one["logits"])
    # a short step: the end of the backward pass (all gradients, one layer) is the peak
    short = mem.memory_terms(**{**kw, "batch": 1, "seq": 1})
    assert short["gradients"] == 20_000


def test_cpu_constants_are_used_when_given():
    lay = mem.TrainableLayout(params=100, modules=((64, 64, 4),))
    t = mem.memory_terms(arch=ARCH, total_params=10_000, unquantized_params=10_000, trainable=lay,
                         cuda_context=mem.CPU_RUNTIME, fragmentation=mem.CPU_FRAGMENTATION)
    assert t["cuda_context"] == mem.CPU_RUNTIME
    assert t["allocator_overhead"] == pytest.approx(
        mem.CPU_FRAGMENTATION * (t["activations"] + t["logits"]))


def test_quant_storage_repr_says_mib():
    s = mem.quant_storage([2**20], [4.0])                # 1 Mi weights: 2 MiB fp16, 0.5 MiB
    assert "2.00 MiB at fp16" in repr(s) and "0.50 MiB at 4.000 bits/param" in repr(s)
    assert " MB" not in repr(s)
