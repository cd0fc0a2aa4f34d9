"""fp16 on a CPU: torch emulates fp16 matrix products on x86 CPUs without AVX512-FP16 or
AVX-NE-CONVERT (measured about 100x slower than fp32 on an AMD EPYC Zen 3, hf/model/device.py), so
there an fp16 base, like a bf16 one, is warned about at load and refused by train() with its fix."""

from __future__ import annotations

import platform

import pytest
import torch

import lora_lab as ll
from lora_lab.hf.model import device as dev
from lora_lab.train.loop import train


@pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64",
                    reason="reads x86 flags from /proc/cpuinfo")
def test_native_fp16_is_what_the_cpu_flags_say():
    """Oracle: the kernel's CPU flags, against the instructions ATen's mkldnn_fp16_device_check asks
    oneDNN for (avx512_fp16, avx_ne_convert; amx_fp16 implies them)."""
    with open("/proc/cpuinfo") as fh:
        flags = next(set(line.split(":", 1)[1].split()) for line in fh if line.startswith("flags"))
    assert dev.cpu_fp16_native() == bool(flags & {"avx512_fp16", "avx_ne_convert", "amx_fp16"})


def test_a_cpu_without_native_fp16_refuses_fp16_matrix_products(tiny_llama_dir, tmp_path, one_thread,
                                                                 monkeypatch):
    """With the chip check answering "emulated", a base loaded in fp16 and 4-bit layers computing in
    fp16 each warn at load and are refused before any step, the fix naming dtype='auto' and the
    compute dtype; with it answering "native", the same fp16 base trains (so the refusal is the
    chip's, not the dtype's); bf16 is judged by its own check."""
    from conftest import assert_half_bases_refused, token_rows  # noqa: E402  (tests/train/conftest.py)

    monkeypatch.setattr(dev, "cpu_bf16_native", lambda: True)
    monkeypatch.setattr(dev, "cpu_fp16_native", lambda: False)
    assert dev.emulated_dtypes().keys() == {torch.float16}
    _, tok = ll.load_model(tiny_llama_dir, device="cpu")
    rows = token_rows(tok, n=8)
    spec = ll.TrainSpec(steps=1, batch_size=8, output_dir=str(tmp_path / "fp16"))
    assert_half_bases_refused(tiny_llama_dir, tok, rows, spec, "fp16")
    bf16, _ = ll.load_model(tiny_llama_dir, device="cpu", dtype="bf16")  # bf16 is native here: no refusal
    assert dev.emulated_half_weights(bf16) == []
    monkeypatch.setattr(dev, "cpu_fp16_native", lambda: True)
    model, _ = ll.load_model(tiny_llama_dir, device="cpu", dtype="fp16")
    model = ll.attach(model, ll.AdapterSpec(r=4, target_modules="all-linear"))
    res = train(model, tok, rows, spec=spec.replace(output_dir=str(tmp_path / "native")))
    assert len(res.loss) == 1 and res.final["precision"] == "fp32"


def test_info_says_when_fp16_is_emulated():
    from lora_lab.cli import info_lines

    line = next(x for x in info_lines() if x.startswith("CPU bf16"))
    assert ("fp16 emulated" in line) == (not dev.cpu_fp16_native())
