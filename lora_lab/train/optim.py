"""Optimizer, learning-rate schedule and mixed precision, chosen from the spec and the device.

* **Precision** (``TrainSpec.precision="auto"``): on CUDA, bf16 autocast where the GPU supports it
  (Ampere and later), else fp16 autocast with a ``GradScaler`` (a T4).  On a CPU, bf16 autocast where
  the chip multiplies bf16 natively (AVX512-BF16, AMX, Arm BF16) and the model's hidden size is
  >= 512 (SmolLM2-135M LoRA: about 1.8x fp32's tokens/s on 2 cores), else fp32: the training loop
  makes "auto" concrete with :func:`lora_lab.hf.model.device.train_precision_choice`, which knows
  the model's width, before :func:`resolve_precision` (which alone, without the model, keeps fp32
  for "auto" on a CPU).  The trained adapter stays fp32 in every case.  fp16 gradients underflow
  without loss scaling; bf16 has fp32's exponent range, so it needs none.
* **Optimizer**: ``"adamw"`` is torch's fused AdamW where the device supports it (CPU and CUDA in
  torch >= 2.4), which is what ``transformers.Trainer`` defaults to (``adamw_torch_fused``) and
  about 9% faster than the per-parameter loop on CPU.  ``"adamw_8bit"``, ``"paged_adamw_8bit"``
  and ``"paged_adamw"`` are bitsandbytes' optimizers (CUDA only), built in :mod:`lora_lab.hf`.
* **Weight decay** (AdamW's decoupled decay, Loshchilov & Hutter 2019) applies to weight matrices
  only: biases and normalisation weights are left out, by ``transformers.Trainer``'s rule
  (:func:`decays`).  Decaying a bias or a norm gain pulls it toward 0, which is not a
  regularisation of anything the model learned (a norm gain's neutral value is 1).
* **Schedule**: exactly ``transformers.get_scheduler``'s ``constant_with_warmup``, ``linear`` and
  ``cosine``: warmup from 0 over ``warmup_steps``, then constant, linear decay or cosine decay
  (Loshchilov & Hutter 2017) to zero at ``max_steps`` (:func:`lr_factor`).
"""

from __future__ import annotations

import math
import re
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ..errors import TrainingError
from ..hf.training.optim import bnb_optimizer
from ..specs import TrainSpec

__all__ = ["Precision", "resolve_precision", "build_optimizer", "param_groups", "decays",
           "lr_factor"]


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


def resolve_precision(choice: str, device: torch.device, model=None) -> Precision:
    """The precision for ``TrainSpec.precision`` on ``device`` (see the module docstring; "auto" on a
    CPU should be made concrete first by ``train_precision_choice``, else it is fp32 here).

    On a CPU where torch has no oneDNN path for bf16 (no native bf16 and no AVX512:
    :func:`~lora_lab.hf.model.device.cpu_bf16_onednn`), bf16 autocast and a ``model`` with bf16
    matrices to multiply (a base loaded in bf16, 4-bit layers computing in bf16) are refused
    (:class:`TrainingError`):
    emulated bf16 products make a step tens to hundreds of times slower than fp32 (measured in
    :data:`lora_lab.hf.model.device.EMULATED_BF16`), which "auto" never picks there.  So is a model
    with fp16 matrices on a CPU that emulates fp16 (:func:`~lora_lab.hf.model.device.cpu_fp16_native`)."""
    _refuse_emulated_half(choice, device, model)
    cuda = device.type == "cuda"
    if choice == "auto":
        choice = ("bf16" if _bf16_ok(device) else "fp16") if cuda else "fp32"
    if choice == "fp32":
        return Precision("fp32", None, False, device.type)
    if choice == "fp16":
        if not cuda:
            raise TrainingError(f"TrainSpec.precision='fp16' needs a CUDA GPU; this model is on "
                                f"{device}.",
                                "pass precision='auto' (bf16 autocast or fp32 on a CPU, by what the chip "
                                "has) or 'bf16'")
        return Precision("fp16", torch.float16, True, "cuda")
    if cuda and not _bf16_ok(device):
        raise TrainingError("TrainSpec.precision='bf16' but this GPU has no bf16 support.",
                            "pass precision='auto' (fp16 with loss scaling here)")
    return Precision("bf16", torch.bfloat16, False, device.type)


def _refuse_emulated_half(choice: str, device: torch.device, model) -> None:
    from ..hf.model import device as dev

    if device.type != "cpu":
        return
    if choice == "bf16" and not dev.cpu_bf16_onednn():
        raise TrainingError(f"TrainSpec(precision='bf16') asks for bf16 autocast, and {dev.EMULATED_BF16}.",
                            "pass precision='auto' (fp32 on this CPU) or 'fp32'")
    slow = dev.emulated_half_weights(model) if model is not None else []
    if slow:
        name, dtype = slow[0]
        why = dev.emulated_dtypes()[dtype]
        raise TrainingError(
            f"{len(slow)} layers of this model multiply in {dev.dtype_name(dtype)} ({name}, ...), and {why}.",
            "load the model with dtype='auto' (fp32 on this CPU) or 'fp32', and no "
            f"QuantSpec(compute_dtype='{str(dtype).removeprefix('torch.')}'); for less memory, "
            "quant='nf4' computes in fp32 here")


# transformers.Trainer.get_decay_parameter_names (5.x): no decay inside an nn.LayerNorm, nor for a
# parameter whose lower-cased dotted name matches one of these
NO_DECAY_LAYERS = (torch.nn.LayerNorm,)
NO_DECAY_NAMES = tuple(re.compile(p) for p in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)",
                                                r"_norm(?:$|\.)"))


def decays(name: str, module: torch.nn.Module) -> bool:
    """Whether weight decay applies to parameter ``name`` of ``module`` (its owner).

    No for parameters of a ``LayerNorm`` and for names that say bias or norm (``…bias``,
    ``…input_layernorm.weight``, ``model.norm.weight``, ``…q_norm.weight``); yes for the rest,
    LoRA's A and B included.  The same rule as ``transformers.Trainer``.
    """
    if isinstance(module, NO_DECAY_LAYERS):
        return False
    return not any(p.search(name.lower()) for p in NO_DECAY_NAMES)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """The trainable parameters as optimizer groups: ``{"params", "weight_decay"}``.

    Decayed ones get ``weight_decay``, biases and norm weights 0 (see :func:`decays`).  With nothing
    to tell apart (no decay asked, or every trainable parameter decays: LoRA on linear layers
    without bias) it is one group, as a checkpoint written before this split holds.
    """
    owner = {id(p): m for m in model.modules() for p in m.parameters(recurse=False)}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if decays(n, owner[id(p)])]
    no_decay = [p for n, p in trainable if not decays(n, owner[id(p)])]
    if weight_decay == 0 or not no_decay:  # one group, in the model's order
        return [{"params": [p for _, p in trainable], "weight_decay": weight_decay}]
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def _adamw(groups, spec: TrainSpec, fused: bool | None):
    return torch.optim.AdamW(groups, lr=spec.lr, weight_decay=spec.weight_decay, fused=fused)


def build_optimizer(spec: TrainSpec, model: torch.nn.Module, device: torch.device):
    """The optimizer named by ``spec.optimizer`` over the model's trainable (adapter) weights, in
    the groups of :func:`param_groups`."""
    name, groups = spec.optimizer, param_groups(model, spec.weight_decay)
    if name in ("adamw", "adamw_fused"):
        try:
            return _adamw(groups, spec, fused=True)
        except (RuntimeError, ValueError) as exc:
            if name == "adamw_fused":
                raise TrainingError(f"Fused AdamW is not available for these parameters on "
                                    f"{device}: {exc}", "pass optimizer='adamw'") from exc
            return _adamw(groups, spec, fused=None)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=spec.lr, weight_decay=spec.weight_decay)
    # bitsandbytes optimizers: CUDA only, built where bitsandbytes may be imported (hf/)
    if device.type != "cuda":
        raise TrainingError(f"TrainSpec.optimizer={name!r} is a bitsandbytes optimizer, which needs "
                            f"a CUDA GPU; this model is on {device}.",
                            "pass optimizer='adamw' (fused AdamW) on CPU")
    return bnb_optimizer(name, groups, lr=spec.lr, weight_decay=spec.weight_decay)


def lr_factor(step: int, max_steps: int, spec: TrainSpec) -> float:
    """Multiplier of ``spec.lr`` for optimizer step ``step`` (0-based: the first update is step 0).

    With w = ``warmup_steps`` and T = ``max_steps``, this is ``transformers.get_scheduler``'s
    lr_lambda (``constant_with_warmup``, ``linear``, ``cosine``), step for step::

        warmup (step < w):   step / w                      (0 at the first step, as there)
        then, p = (step - w) / max(1, T - w):
            constant         1
            linear           max(0, 1 - p)                 = (T - step) / (T - w)
            cosine           max(0, (1 + cos(π p)) / 2)

    A ``LambdaLR`` applies lr_lambda(0) at the first ``optimizer.step()`` and moves on with
    ``scheduler.step()`` after it, so step s runs at lr_lambda(s).  (The Trainer *logs* the rate
    after ``scheduler.step()``, i.e. lr_lambda(s + 1) beside step s; this loop logs the rate it
    used.)  With warmup, the first step therefore has lr 0: Adam's moments are filled, the weights
    do not move.
    """
    warm = spec.warmup_steps
    if step < warm:
        return step / max(1, warm)
    p = (step - warm) / max(1, max_steps - warm)
    if spec.schedule == "linear":
        return max(0.0, 1.0 - p)
    if spec.schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * p)))
    return 1.0
