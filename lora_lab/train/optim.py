"""Optimizer, learning-rate schedule and mixed precision, chosen from the spec and the device.

* **Precision** (``TrainSpec.precision="auto"``): fp32 on CPU; on CUDA, bf16 autocast where the GPU
  supports it (Ampere and later), else fp16 autocast with a ``GradScaler`` (a T4).  fp16 gradients
  underflow without loss scaling; bf16 has fp32's exponent range, so it needs none.
* **Optimizer**: ``"adamw"`` is torch's fused AdamW where the device supports it (CPU and CUDA in
  torch >= 2.4), which is what ``transformers.Trainer`` defaults to (``adamw_torch_fused``) and
  about 9% faster than the per-parameter loop on CPU.  ``"adamw_8bit"``, ``"paged_adamw_8bit"``
  and ``"paged_adamw"`` are bitsandbytes' optimizers (CUDA only), built in :mod:`lora_lab.hf`.
* **Schedule**: linear warmup over ``warmup_steps``, then constant, linear decay or cosine decay
  (Loshchilov & Hutter 2017) to zero at ``max_steps``.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ..errors import TrainingError
from ..hf.training.optim import bnb_optimizer
from ..specs import TrainSpec

__all__ = ["Precision", "resolve_precision", "build_optimizer", "lr_factor"]


@dataclass(frozen=True)
class Precision:
    """``dtype`` is the autocast dtype (None: no autocast, fp32); ``scaler``: use a GradScaler."""

    name: str
    dtype: torch.dtype | None
    scaler: bool
    device_type: str

    def autocast(self):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def _bf16_ok(device: torch.device) -> bool:
    from ..hf.model.device import bf16_supported

    return bf16_supported(str(device))


def resolve_precision(choice: str, device: torch.device) -> Precision:
    """The precision for ``TrainSpec.precision`` on ``device`` (see the module docstring)."""
    cuda = device.type == "cuda"
    if choice == "auto":
        choice = ("bf16" if _bf16_ok(device) else "fp16") if cuda else "fp32"
    if choice == "fp32":
        return Precision("fp32", None, False, device.type)
    if choice == "fp16":
        if not cuda:
            raise TrainingError(f"TrainSpec.precision='fp16' needs a CUDA GPU; this model is on "
                                f"{device}.", "pass precision='auto' (fp32 on CPU)")
        return Precision("fp16", torch.float16, True, "cuda")
    if cuda and not _bf16_ok(device):
        raise TrainingError("TrainSpec.precision='bf16' but this GPU has no bf16 support.",
                            "pass precision='auto' (fp16 with loss scaling here)")
    return Precision("bf16", torch.bfloat16, False, device.type)


def _adamw(params, spec: TrainSpec, fused: bool | None):
    return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay, fused=fused)


def build_optimizer(spec: TrainSpec, params: list[torch.nn.Parameter], device: torch.device):
    """The optimizer named by ``spec.optimizer`` over ``params`` (the trainable adapter weights)."""
    name = spec.optimizer
    if name in ("adamw", "adamw_fused"):
        try:
            return _adamw(params, spec, fused=True)
        except (RuntimeError, ValueError) as exc:
            if name == "adamw_fused":
                raise TrainingError(f"Fused AdamW is not available for these parameters on "
                                    f"{device}: {exc}", "pass optimizer='adamw'") from exc
            return _adamw(params, spec, fused=None)
    if name == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, weight_decay=spec.weight_decay)
    # bitsandbytes optimizers: CUDA only, built where bitsandbytes may be imported (hf/)
    if device.type != "cuda":
        raise TrainingError(f"TrainSpec.optimizer={name!r} is a bitsandbytes optimizer, which needs "
                            f"a CUDA GPU; this model is on {device}.",
                            "pass optimizer='adamw' (fused AdamW) on CPU")
    return bnb_optimizer(name, params, lr=spec.lr, weight_decay=spec.weight_decay)


def lr_factor(step: int, max_steps: int, spec: TrainSpec) -> float:
    """Multiplier of ``spec.lr`` for optimizer step ``step`` (0-based).

    Warmup: (step + 1) / warmup_steps.  Then with progress p = (step - warmup) / (max - warmup):
    constant 1, linear 1 - p, cosine (1 + cos(π p)) / 2.
    """
    warm = spec.warmup_steps
    if step < warm:
        return (step + 1) / warm
    p = (step - warm) / max(1, max_steps - warm)
    if spec.schedule == "linear":
        return max(0.0, 1.0 - p)
    if spec.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(p, 1.0)))
    return 1.0
