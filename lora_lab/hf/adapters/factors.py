"""The LoRA factors of a model: the one boundary the spectrum analysis reads through.

For each LoRA-adapted module peft stores ``lora_A`` (an ``in → r`` linear, weight r×in) and
``lora_B`` (an ``r → out`` linear, weight out×r), and a scaling s (α/r, or α/√r with rsLoRA), so
that the layer computes ``y = W x + s·B·A x``.  The update is therefore

    ΔW = s · B · A,   shape (out, in),  rank ≤ r       (Hu et al. 2021, §4.1)

GPT-2-style ``Conv1D`` layers store their weight transposed, as (in, out) ("fan_in_fan_out"); the
factors given here are still in the (out, in) convention above, and ``fan_in_fan_out`` says that
peft adds ``ΔWᵀ`` to the stored weight when merging.  This works on quantized bases too: the
factors are full-precision parameters beside the packed 4-bit weight.

DoRA (Liu et al. 2024, §4) layers also learn a magnitude m (one value per output feature) and
compute W' = m · (W + s·B·A) / ‖W + s·B·A‖_c, so their true update W' − W is *not* s·B·A: it is
full rank and depends on the base weight W.  :class:`LoraFactors` carries ``magnitude`` for them,
and with ``lora_factors(..., with_base=True)`` the dense base weight too, so that
:meth:`LoraFactors.true_delta` gives W' − W (:func:`lora_lab.core.spectrum.dora_delta`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from ...core.spectrum import dora_delta
from ...errors import AdapterError
from .._peft import active_name, lora_layers, strip_prefix
from ..model.inspect import layer_index, module_type
from ..model.kbit import dense_weight

__all__ = ["check_matrix", "LoraFactors", "lora_factors", "saved_lora_factors"]


@dataclass(frozen=True, eq=False)
class LoraFactors:
    """One module's LoRA update ΔW = scaling · B @ A, with A: (r, in) and B: (out, r).

    For DoRA: ``magnitude`` m (out,), and ``weight``, the dense base weight W (out, in) as the layer
    computes with it (dequantized, Conv1D transposed), when read with ``with_base=True``."""

    name: str
    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    fan_in_fan_out: bool = False
    use_dora: bool = False
    magnitude: torch.Tensor | None = None
    weight: torch.Tensor | None = None

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
        """The dense s·B·A (out × in).  Forms the full matrix: use for small layers and tests.
        For DoRA this is only the direction update; the layer's real change is :meth:`true_delta`."""
        return self.scaling * (self.B.float() @ self.A.float())

    def true_delta(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The dense W' − W (out × in) the layer really adds: s·B·A for LoRA, and for DoRA
        (g − 1) ⊙ W + g ⊙ s·B·A with g = m / ‖W + s·B·A‖_c (:func:`~lora_lab.core.spectrum.dora_delta`)."""
        if not self.use_dora:
            return self.scaling * (self.B.to(dtype) @ self.A.to(dtype))
        if self.weight is None or self.magnitude is None:
            raise AdapterError(f"{self.name} is a DoRA layer: its true ΔW needs the base weight and "
                               "the magnitude, which these factors do not carry.",
                               "read them from the model: lora_factors(model, adapter, "
                               "with_base=True)")
        return dora_delta(self.weight, self.B, self.A, self.scaling, self.magnitude, dtype=dtype)

    def __repr__(self) -> str:
        return (f"LoraFactors({self.name!r}, r={self.r}, shape={self.shape}, "
                f"scaling={self.scaling:g}{', fan_in_fan_out' if self.fan_in_fan_out else ''}"
                f"{', DoRA' if self.use_dora else ''})")


def _adapter_name(model: nn.Module, adapter: str | None) -> str:
    active = active_name(model, adapter)
    if not active:
        raise AdapterError("The model has no active adapter to read factors from.",
                           "attach one with lora_lab.attach(model, spec), or pass adapter=NAME")
    return active


def _base_weight(module: nn.Module, fan_in_fan_out: bool) -> torch.Tensor:
    """The dense base weight (out × in) the layer computes with: dequantized, Conv1D transposed."""
    base = module.get_base_layer()
    w = dense_weight(base, base.weight).detach()
    return w.T if fan_in_fan_out else w


def lora_factors(model: nn.Module, adapter: str | None = None, *,
                 with_base: bool = False) -> Iterator[LoraFactors]:
    """Yield :class:`LoraFactors` for every module that carries LoRA adapter ``adapter``
    (the active adapter when None).  Tensors are detached views; nothing is copied or changed.

    DoRA layers always carry their ``magnitude``; ``with_base=True`` adds their dense base weight
    (one dequantization per DoRA layer on a 4/8-bit base), which :meth:`LoraFactors.true_delta`
    needs.  Plain LoRA layers never read the base weight."""
    name = _adapter_name(model, adapter)
    found = False
    for clean, module in lora_layers(model, name):
        found = True
        A = module.lora_A[name].weight.detach()
        B = module.lora_B[name].weight.detach()
        fifo = bool(getattr(module, "fan_in_fan_out", False))
        dora = bool(getattr(module, "use_dora", {}).get(name, False))
        magnitude = module.lora_magnitude_vector[name].weight.detach() if dora else None
        weight = _base_weight(module, fifo) if dora and with_base and A.ndim == 2 else None
        yield LoraFactors(name=clean, A=A, B=B, scaling=float(module.scaling[name]),
                          fan_in_fan_out=fifo, use_dora=dora, magnitude=magnitude, weight=weight)
    if not found:
        have = sorted(getattr(model, "peft_config", {}) or [])
        raise AdapterError(f"No LoRA module carries an adapter named {name!r}.",
                           f"pass one of the LoRA adapters on this model: {have}")


# ----------------------------------------------------------------------------- from a saved folder
_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_magnitude_vector": "m"}


def _pattern_value(patterns: dict, name: str, default):
    """peft's rank_pattern / alpha_pattern lookup: the first key that matches the end of ``name``."""
    import re

    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{key}$", name):
            return value
    return default


def _model_order(name: str) -> tuple:
    """Sort key close to the model's own order: by layer number, then q, k, v, o, gate, up, down."""
    layer = layer_index(name)
    kind = module_type(name)
    return (layer if layer is not None else -1,
            _ORDER.index(kind) if kind in _ORDER else len(_ORDER), name)


def saved_lora_factors(path) -> list[LoraFactors]:
    """The :class:`LoraFactors` of a LoRA adapter saved by :func:`lora_lab.save_adapter` or peft's
    ``save_pretrained``, read straight from ``adapter_config.json`` and
    ``adapter_model.safetensors``: no base model is loaded, so a 7B adapter costs its own few MB.

    The scaling of each module is what peft would give it: α/r, or α/√r with rsLoRA, with
    ``rank_pattern``/``alpha_pattern`` applied; r is read from A's shape.  Modules come in layer
    order (q, k, v, o, gate, up, down within a layer).  Like :func:`lora_factors`, embedding LoRA
    (``lora_embedding_A/B``) is left out.  A DoRA adapter's factors carry its saved magnitude, but
    not the base weight its true ΔW needs (:meth:`LoraFactors.true_delta` then refuses).
    """
    import json
    import math
    from pathlib import Path

    from safetensors.torch import load_file

    folder = Path(path)
    config_file, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not config_file.exists():
        raise AdapterError(f"{folder} is not a saved adapter (no adapter_config.json).",
                           "pass the folder written by lora_lab.save_adapter or peft's "
                           "save_pretrained")
    config = json.loads(config_file.read_text())
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise AdapterError(f"{folder} holds a {config.get('peft_type')} adapter; spectra of "
                           "ΔW = s·B·A exist for LoRA adapters only.",
                           "pass a LoRA (or DoRA / rsLoRA) adapter folder")
    if not weights.exists():
        raise AdapterError(f"{folder} has no adapter_model.safetensors.",
                           "save the adapter again with lora_lab.save_adapter (safetensors only)")
    tensors = load_file(str(weights))
    parts: dict[str, dict] = {}
    for key, value in tensors.items():
        for suffix, which in _SUFFIXES.items():
            if key.endswith(suffix):
                name = strip_prefix(key[:-len(suffix)])
                parts.setdefault(name, {})[which] = value
    rs, fifo = bool(config.get("use_rslora")), bool(config.get("fan_in_fan_out"))
    factors = []
    for name in sorted(parts, key=_model_order):
        A, B = parts[name].get("A"), parts[name].get("B")
        if A is None or B is None:
            raise AdapterError(f"{weights} has only one of lora_A/lora_B for {name}.",
                               "the file is incomplete: save the adapter again")
        r = A.shape[0]
        alpha = _pattern_value(config.get("alpha_pattern"), name, config.get("lora_alpha", r))
        scaling = alpha / math.sqrt(r) if rs else alpha / r
        factors.append(LoraFactors(name=name, A=A, B=B, scaling=float(scaling),
                                   fan_in_fan_out=fifo, use_dora=bool(config.get("use_dora")),
                                   magnitude=parts[name].get("m")))
    if not factors:
        raise AdapterError(f"{weights} holds no lora_A/lora_B tensors.",
                           "pass a LoRA adapter folder")
    return factors


def check_matrix(f: "LoraFactors") -> None:
    """Refuse factors that are not matrices (a convolution LoRA): the spectrum math needs B, A 2-D."""
    if f.A.ndim != 2 or f.B.ndim != 2:
        raise AdapterError(f"Module {f.name!r} has LoRA factors of shapes {tuple(f.B.shape)} and "
                           f"{tuple(f.A.shape)}, not matrices (a convolution LoRA?).",
                           "spectrum analysis covers Linear and Conv1D LoRA modules; target those")
