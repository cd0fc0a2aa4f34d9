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


def dtype_name(dtype: torch.dtype) -> str | None:
    """The short name of a floating dtype lora_lab stores weights in (``"fp32"``, ``"bf16"``,
    ``"fp16"``), or None for any other."""
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype)


def memory_limit_gb() -> float:
    """The memory this process may use, in GB (10⁹ bytes), from the first of: the ``MEM_LIMIT``
    environment variable (what mybinder.org sets: 2 GB there), the container's cgroup limit (v2
    ``memory.max``, then v1 ``memory.limit_in_bytes``; "max" or a huge number means none), and the
    machine's physical RAM.  Notebooks read it to choose what to run (e.g. skip a comparison that
    would not fit a Binder kernel)."""
    import os

    for source in (os.environ.get("MEM_LIMIT"), "/sys/fs/cgroup/memory.max",
                   "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            value = source if source is None or not source.startswith("/") else open(source).read().strip()
        except OSError:
            continue
        if value and value.isdigit() and 0 < int(value) < 2**60:
            return int(value) / 1e9
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


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
