"""Compress a trained adapter to a lower rank.

Each ΔW = s·B·A is truncated by SVD (Eckart–Young: the best rank-k approximation in Frobenius
norm), computed from the factors (QR of B and Aᵀ, SVD of the small r × r core), and installed as a
new peft LoRA adapter whose product equals the truncated ΔW.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

from ...core.spectrum import Spectrum, lowrank_svd
from ...errors import AdapterError
from .._peft import active_name, is_peft, lora_layers
from ..adapters.factors import LoraFactors, check_matrix, lora_factors

__all__ = ["Compression", "compress_adapter"]


# ----------------------------------------------------------------------------- compress_adapter
@dataclass(frozen=True, eq=False)
class Compression:
    """What :func:`compress_adapter` did: the new adapter's name and, per module, the error kept.

    ``table`` columns: name, layer, module_type, r (before), rank (after), energy_kept,
    rel_error = ‖ΔW − ΔW_k‖_F / ‖ΔW‖_F (= √(1 − energy_kept), Eckart–Young).
    """

    adapter: str
    source: str
    rank: int
    table: pd.DataFrame
    parameters_before: int
    parameters_after: int

    def to_frame(self) -> pd.DataFrame:
        return self.table

    def __repr__(self) -> str:
        e = self.table["rel_error"]
        return (f"Compression({self.source!r} → {self.adapter!r}, rank {self.rank}: "
                f"{len(self.table)} modules, ΔW relative error median {e.median():.3g}, max "
                f"{e.max():.3g}; LoRA parameters {self.parameters_before:,} → "
                f"{self.parameters_after:,})")

    def _repr_html_(self) -> str:
        return f"<b>{self.__repr__()}</b>" + self.table.to_html(index=False, float_format="%.4g")


def _peft_lora_config(model: nn.Module, adapter: str):
    configs = getattr(model, "peft_config", None) or {}
    if adapter not in configs:
        raise AdapterError(f"The model has no adapter named {adapter!r} to compress.",
                           f"pass adapter= one of {sorted(configs)}")
    cfg = configs[adapter]
    if str(getattr(cfg, "peft_type", "")).split(".")[-1].upper() != "LORA":
        raise AdapterError(f"Adapter {adapter!r} is {cfg.peft_type}, not LoRA: it has no rank to cut.",
                           "compress LoRA adapters only")
    return cfg


def _refuse(cfg, factors: list, adapter: str, rank: int, new_name: str, model) -> None:
    if getattr(cfg, "use_dora", False) or any(f.use_dora for f in factors):
        raise AdapterError(
            f"Adapter {adapter!r} is a DoRA adapter (Liu et al. 2024, §4): W' = m · (W + s·B·A) / "
            "‖W + s·B·A‖_c, so its learned magnitude m rescales every output row of W + s·B·A and "
            "its true update W' − W is full rank and depends on W.  Cutting s·B·A to a lower rank "
            "does not cut that update, so no lower-rank adapter is equivalent to it.",
            "see its true spectrum with lora_lab.adapter_spectra(model) (marked DoRA); to deploy "
            "it, merge it (lora_lab.merged_copy); for a smaller adapter, retrain plain LoRA at the "
            "rank you pick")
    r_max = max(f.A.shape[0] for f in factors)
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank < r_max:
        raise AdapterError(f"compress_adapter got rank={rank!r}, but adapter {adapter!r} has "
                           f"r={r_max}: the new rank must be an integer in 1..{r_max - 1}.",
                           f"pick a rank below {r_max}, e.g. from adapter_spectra(model).table['k90']")
    if not isinstance(new_name, str) or not new_name or "." in new_name:
        raise AdapterError(f"new_name={new_name!r} is not a usable adapter name.",
                           "pass a short name without dots, such as 'default_r4'")
    if new_name in model.peft_config:
        raise AdapterError(f"The model already has an adapter named {new_name!r}.",
                           "pass new_name='another_name', or delete the old one first")
    if any(getattr(m, "merged_adapters", None) for m in model.modules()):
        raise AdapterError("The model has merged adapters; a new adapter would sit on merged weights.",
                           "call lora_lab.unmerge_adapter(model) first")


def _truncated_factors(f: LoraFactors, rank: int, new_scaling: float):
    """B', A' with new_scaling · B' · A' = the best rank-``rank`` approximation of ΔW."""
    U, S, Vh = lowrank_svd(f.B, f.A, f.scaling)
    k = min(rank, len(S))
    root = (S[:k] / new_scaling).sqrt()
    B_new = torch.zeros(f.B.shape[0], rank, dtype=torch.float64)
    A_new = torch.zeros(rank, f.A.shape[1], dtype=torch.float64)
    B_new[:, :k] = U[:, :k].cpu() * root.cpu()            # U_k √S_k / √s'
    A_new[:k] = root.cpu()[:, None] * Vh[:k].cpu()          # √S_k V_kᵀ / √s'
    energy = Spectrum(S, f.shape).energy_at(rank)
    return B_new, A_new, energy


def _add_adapter(model: nn.Module, name: str, config) -> None:
    if is_peft(model):
        model.add_adapter(name, config)
    else:  # a transformers model with peft integration
        model.add_adapter(config, adapter_name=name)


def _copy_modules_to_save(model: nn.Module, source: str, target: str) -> None:
    """Carry trained full copies (``modules_to_save``, e.g. an lm_head) over to the new adapter."""
    for module in model.modules():
        saved = getattr(module, "modules_to_save", None)
        if isinstance(saved, nn.ModuleDict) and source in saved and target in saved:
            saved[target].load_state_dict(saved[source].state_dict())


def _install(model: nn.Module, factors: list, adapter: str, new_name: str, rank: int) -> list:
    """Write the truncated factors into adapter ``new_name``; return the per-module report rows."""
    modules, rows = dict(lora_layers(model)), []
    for f in factors:
        layer = modules[f.name]
        B_new, A_new, energy = _truncated_factors(f, rank, float(layer.scaling[new_name]))
        wa, wb = layer.lora_A[new_name].weight, layer.lora_B[new_name].weight
        wa.copy_(A_new.to(wa.dtype)), wb.copy_(B_new.to(wb.dtype))
        src_bias, dst_bias = layer.lora_B[adapter].bias, layer.lora_B[new_name].bias
        if src_bias is not None and dst_bias is not None:
            dst_bias.copy_(src_bias)
        rows.append(dict(name=f.name, layer=f.layer, module_type=f.module_type, r=f.A.shape[0],
                         rank=rank, energy_kept=energy, rel_error=math.sqrt(max(0.0, 1.0 - energy))))
    return rows


def compress_adapter(model: nn.Module, rank: int, adapter: str | None = None,
                     new_name: str | None = None) -> Compression:
    """Cut adapter ``adapter`` (active if None) to rank ``rank`` and add it as adapter ``new_name``.

    For each module ΔW = s·B·A = U S Vᵀ (from the factors), the new factors are
    B' = U_k √S_k / √s', A' = √S_k V_kᵀ / √s', so that s' · B' · A' = U_k S_k V_kᵀ, the best rank-k
    approximation (Eckart–Young), where s' is the new adapter's own scaling (same alpha, r = k,
    rsLoRA kept).  The new adapter is a plain peft LoRA adapter (``r = rank``): it saves, loads and
    trains as usual.  The active adapter is not changed: switch with ``model.set_adapter(new_name)``.
    Adapters initialised with PiSSA/OLoRA are cut relative to the residual base now in memory.
    Refused: DoRA adapters (their true update W' − W includes the learned magnitude and is full
    rank, so truncating s·B·A is not a rank-k version of it), ``rank`` ≥ the current r, merged
    models.
    """
    adapter = active_name(model, adapter)
    cfg = _peft_lora_config(model, adapter)
    with torch.no_grad():
        factors = list(lora_factors(model, adapter))
        new_name = new_name if new_name is not None else f"{adapter}_r{rank}"
        _refuse(cfg, factors, adapter, rank, new_name, model)
        for f in factors:
            check_matrix(f)
        new_cfg = copy.deepcopy(cfg)
        new_cfg.r, new_cfg.rank_pattern, new_cfg.alpha_pattern = rank, {}, {}
        new_cfg.init_lora_weights = True          # never re-run PiSSA/LoftQ on the base weights
        _add_adapter(model, new_name, new_cfg)
        try:
            rows = _install(model, factors, adapter, new_name, rank)
            _copy_modules_to_save(model, adapter, new_name)
        except Exception:
            model.delete_adapter(new_name)            # never leave a half-filled adapter behind
            raise
    before = sum(f.A.shape[0] * sum(f.shape) for f in factors)
    after = sum(rank * sum(f.shape) for f in factors)
    table = pd.DataFrame(rows, columns=["name", "layer", "module_type", "r", "rank", "energy_kept",
                                        "rel_error"])
    table["layer"] = table["layer"].astype("Int64")
    specs = dict(getattr(model, "lora_lab_specs", {}))
    if adapter in specs:  # the compressed adapter is the same choice at a lower rank
        specs[new_name] = specs[adapter].replace(r=rank, alpha=specs[adapter].alpha)
        model.lora_lab_specs = specs
    return Compression(new_name, adapter, rank, table, before, after)
