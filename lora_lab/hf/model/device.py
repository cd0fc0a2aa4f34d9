"""Device and dtype defaults: the one place that asks what hardware is here.

Rule (DESIGN.md, "device-aware defaults"): fp32 on CPU, bf16 on GPUs that support it, fp16 on GPUs
that do not (a Colab T4).  Users never need to know this.
"""

from __future__ import annotations

import torch


def default_device() -> str:
    """``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def bf16_supported(device: str | None = None) -> bool:
    """Native bf16 on ``device``: NVIDIA compute capability 8.0+ (Ampere: A100, A10G, L4, H100) or
    ROCm.  ``torch.cuda.is_bf16_supported()`` also answers True on a T4 (sm_75), where bf16 is only
    emulated and slow, so the compute capability decides."""
    device = device or default_device()
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return False
    if torch.version.hip:
        return True
    return torch.cuda.get_device_capability(torch.device(device))[0] >= 8


def default_compute_dtype(device: str | None = None) -> torch.dtype:
    """The compute dtype for ``device``: fp32 on CPU, bf16 where supported, else fp16."""
    device = device or default_device()
    if not device.startswith("cuda"):
        return torch.float32
    return torch.bfloat16 if bf16_supported(device) else torch.float16


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def as_dtype(value) -> torch.dtype | None:
    """Turn ``"bf16"``, ``"float16"``, a ``torch.dtype`` or None into a ``torch.dtype`` (or None)."""
    from ...errors import LoraLabError

    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value.lower() in _DTYPES:
        return _DTYPES[value.lower()]
    raise LoraLabError(f"dtype {value!r} is not one lora_lab understands.",
                       f"pass one of {sorted(set(_DTYPES))} or a torch.dtype")


def four_bit_check() -> str:
    """Quantize and dequantize a small tensor with NF4 through bitsandbytes; report the outcome."""
    try:
        import bitsandbytes.functional as F

        device = default_device()
        w = torch.randn(256, 256, device=device)
        q, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
        err = float((F.dequantize_4bit(q, state) - w).norm() / w.norm())
        return f"works on {device} (NF4 round-trip relative error {err:.3f})"
    except Exception as exc:  # noqa: BLE001 - a diagnostic reports any failure
        return f"FAILS: {type(exc).__name__}: {exc}"
