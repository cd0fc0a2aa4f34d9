"""The LoRA factors of a model: the one boundary the spectrum analysis reads through.

For each LoRA-adapted module peft stores ``lora_A`` (an ``in → r`` linear, weight r×in) and
``lora_B`` (an ``r → out`` linear, weight out×r), and a scaling s (α/r, or α/√r with rsLoRA), so
that the layer computes ``y = W x + s·B·A x``.  The update is therefore

    ΔW = s · B · A,   shape (out, in),  rank ≤ r       (Hu et al. 2021, §4.1)

GPT-2-style ``Conv1D`` layers store their weight transposed, as (in, out) ("fan_in_fan_out"); the
factors given here are still in the (out, in) convention above, and ``fan_in_fan_out`` says that
peft adds ``ΔWᵀ`` to the stored weight when merging.  This works on quantized bases too: the
factors are full-precision parameters beside the packed 4-bit weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from ..errors import AdapterError
from .inspect import layer_index, module_type

__all__ = ["LoraFactors", "lora_factors"]


@dataclass(frozen=True)
class LoraFactors:
    """One module's LoRA update ΔW = scaling · B @ A, with A: (r, in) and B: (out, r)."""

    name: str
    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    fan_in_fan_out: bool = False
    use_dora: bool = False

    @property
    def r(self) -> int:
        return self.A.shape[0]

    @property
    def layer(self) -> int | None:
        return layer_index(self.name)

    @property
    def module_type(self) -> str:
        return module_type(self.name)

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of ΔW."""
        return (self.B.shape[0], self.A.shape[1])

    def delta(self) -> torch.Tensor:
        """The dense ΔW = s·B·A (out × in).  Forms the full matrix: use for small layers and tests."""
        return self.scaling * (self.B.float() @ self.A.float())

    def __repr__(self) -> str:
        return (f"LoraFactors({self.name!r}, r={self.r}, shape={self.shape}, "
                f"scaling={self.scaling:g}{', fan_in_fan_out' if self.fan_in_fan_out else ''})")


def _adapter_name(model: nn.Module, adapter: str | None) -> str:
    if adapter is not None:
        return adapter
    active = getattr(model, "active_adapter", None)
    if isinstance(active, (list, tuple)):
        active = active[0] if active else None
    if not active:
        raise AdapterError("The model has no active adapter to read factors from.",
                           "attach one with lora_lab.attach(model, spec), or pass adapter=NAME")
    return active


def lora_factors(model: nn.Module, adapter: str | None = None) -> Iterator[LoraFactors]:
    """Yield :class:`LoraFactors` for every module that carries LoRA adapter ``adapter``
    (the active adapter when None).  Tensors are detached views; nothing is copied or changed."""
    name = _adapter_name(model, adapter)
    found = False
    for mod_name, module in model.named_modules():
        lora_A = getattr(module, "lora_A", None)
        if not isinstance(lora_A, nn.ModuleDict) or name not in lora_A:
            continue
        found = True
        A = lora_A[name].weight.detach()
        B = module.lora_B[name].weight.detach()
        dora = getattr(module, "use_dora", {}).get(name, False)
        clean = mod_name[len("base_model.model."):] if mod_name.startswith("base_model.model.") else mod_name
        yield LoraFactors(name=clean, A=A, B=B, scaling=float(module.scaling[name]),
                          fan_in_fan_out=bool(getattr(module, "fan_in_fan_out", False)),
                          use_dora=bool(dora))
    if not found:
        have = sorted(getattr(model, "peft_config", {}) or [])
        raise AdapterError(f"No LoRA module carries an adapter named {name!r}.",
                           f"pass one of the LoRA adapters on this model: {have}")
