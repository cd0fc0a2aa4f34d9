"""Spectra of a model's LoRA updates: per-module analysis, comparison of two adapters, compression.

Everything here reads the model through :func:`lora_lab.hf.factors.lora_factors`, which gives each
module's ΔW = s · B · A (B: out × r, A: r × in) as factors; the math is in
:mod:`lora_lab.core.spectrum` and never forms ΔW.

* :func:`adapter_spectra` — one :class:`~lora_lab.core.spectrum.Spectrum` per adapted module, with a
  table (effective rank, stable rank, k for 90% / 99% energy, …).
* :func:`compare_adapters` — subspace similarity φ per module (LoRA paper §7.2).
* :func:`compress_adapter` — truncate every ΔW to a lower rank by SVD (Eckart–Young: the best
  rank-k approximation in Frobenius norm) and install the result as a new peft LoRA adapter.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

from ..core.spectrum import Spectrum, lowrank_svd, lowrank_svdvals, subspace_similarity_grid
from ..errors import AdapterError
from .factors import LoraFactors, lora_factors
from .inspect import layer_index, module_type

__all__ = ["AdapterSpectra", "AdapterComparison", "Compression", "adapter_spectra",
           "spectra_from_factors", "compare_adapters", "compress_adapter"]

SPECTRA_COLUMNS = ["name", "layer", "module_type", "out", "in", "r", "scaling", "top_sigma",
                   "effective_rank", "stable_rank", "k90", "k99"]


def _check_2d(f) -> None:
    if f.A.ndim != 2 or f.B.ndim != 2:
        raise AdapterError(f"Module {f.name!r} has LoRA factors of shapes {tuple(f.B.shape)} and "
                           f"{tuple(f.A.shape)}, not matrices (a convolution LoRA?).",
                           "spectrum analysis covers Linear and Conv1D LoRA modules; target those")


# ----------------------------------------------------------------------------- adapter_spectra
@dataclass(frozen=True, eq=False)
class AdapterSpectra:
    """The spectrum of every adapted module of one adapter.

    ``spectra``: module name → :class:`Spectrum` (of ΔW = s·B·A, out × in), in model order.
    ``ranks``, ``scalings``: module name → r and s.  ``table`` / :meth:`to_frame`: one row per
    module with the columns in ``SPECTRA_COLUMNS``.
    """

    adapter: str | None
    spectra: dict
    ranks: dict
    scalings: dict

    def to_frame(self) -> pd.DataFrame:
        rows = []
        for name, s in self.spectra.items():
            layer = layer_index(name)
            rows.append(dict(name=name, layer=layer if layer is not None else pd.NA,
                             module_type=module_type(name), out=s.shape[0], **{"in": s.shape[1]},
                             r=self.ranks[name], scaling=self.scalings[name], top_sigma=s.top,
                             effective_rank=s.effective_rank, stable_rank=s.stable_rank,
                             k90=s.rank_for_energy(0.9), k99=s.rank_for_energy(0.99)))
        frame = pd.DataFrame(rows, columns=SPECTRA_COLUMNS)
        frame["layer"] = frame["layer"].astype("Int64")
        return frame

    @property
    def table(self) -> pd.DataFrame:
        return self.to_frame()

    def energy_at(self, k: int) -> pd.Series:
        """Per module, the share of ‖ΔW‖²_F kept by a rank-k cut."""
        return pd.Series({n: s.energy_at(k) for n, s in self.spectra.items()}, name=f"energy@{k}")

    def error_at(self, k: int) -> pd.Series:
        """Per module, the relative Frobenius error √(1 − energy) of a rank-k cut."""
        return pd.Series({n: s.error_at(k) for n, s in self.spectra.items()}, name=f"error@{k}")

    def parameters_at(self, k: int) -> int:
        """LoRA parameters of the adapter cut to rank k: Σ min(k, r) · (out + in)."""
        return sum(min(k, self.ranks[n]) * (s.shape[0] + s.shape[1])
                   for n, s in self.spectra.items())

    def __getitem__(self, name: str) -> Spectrum:
        return self.spectra[name]

    def __len__(self) -> int:
        return len(self.spectra)

    def __repr__(self) -> str:
        if not self.spectra:
            return f"AdapterSpectra({self.adapter!r}: no modules)"
        t = self.to_frame()
        return (f"AdapterSpectra({self.adapter!r}: {len(t)} modules, r={sorted(set(t['r']))}, "
                f"effective rank {t['effective_rank'].min():.2f}–{t['effective_rank'].max():.2f} "
                f"(median {t['effective_rank'].median():.2f}), k90 median {t['k90'].median():g})")

    def _repr_html_(self) -> str:
        return f"<b>{self.__repr__()}</b>" + self.to_frame().to_html(index=False, float_format="%.4g")


def spectra_from_factors(factors, adapter: str | None = None) -> AdapterSpectra:
    """:class:`AdapterSpectra` from any iterable of objects with ``name, A, B, scaling``."""
    spectra, ranks, scalings = {}, {}, {}
    for f in factors:
        _check_2d(f)
        shape = (f.B.shape[0], f.A.shape[1])
        spectra[f.name] = Spectrum(lowrank_svdvals(f.B, f.A, f.scaling), shape, f.name)
        ranks[f.name], scalings[f.name] = int(f.A.shape[0]), float(f.scaling)
    return AdapterSpectra(adapter, spectra, ranks, scalings)


def _resolved_name(model, adapter):
    if adapter is not None:
        return adapter
    active = getattr(model, "active_adapter", None)
    return active[0] if isinstance(active, (list, tuple)) and active else active


def adapter_spectra(model, adapter: str | None = None) -> AdapterSpectra:
    """Spectrum of ΔW = s·B·A for every module carrying LoRA adapter ``adapter`` (active if None).

    ``model`` may also be a saved adapter folder: its factors are then read from the file alone
    (:func:`lora_lab.hf.factors.saved_lora_factors`), without loading any base model.
    O((out + in) · r²) per module, in float64; nothing on the model changes.  For DoRA adapters this
    is the spectrum of the low-rank direction update B·A (the learned magnitude is not included).
    """
    if isinstance(model, (str, os.PathLike)):
        from .factors import saved_lora_factors

        return spectra_from_factors(saved_lora_factors(model), adapter or "default")
    with torch.no_grad():
        return spectra_from_factors(lora_factors(model, adapter), _resolved_name(model, adapter))


# ----------------------------------------------------------------------------- compare_adapters
@dataclass(frozen=True, eq=False)
class AdapterComparison:
    """Subspace similarity φ between two adapters, module by module (LoRA paper §7.2).

    ``grids``: module name → (k_a × k_b) tensor with φ(i, j) for the top i and top j singular
    directions (``side`` says which: ``"right"`` = input space, the rows of A, as in the paper).
    ``table``: per module φ(1, 1), φ(k, k) for k = min(k_a, k_b), the grid mean, and the random
    baseline k / d.  ``only_in_a`` / ``only_in_b``: modules the other adapter does not adapt.
    """

    side: str
    grids: dict
    table: pd.DataFrame
    only_in_a: tuple
    only_in_b: tuple

    def to_frame(self) -> pd.DataFrame:
        return self.table

    def __repr__(self) -> str:
        t = self.table
        if t.empty:
            return "AdapterComparison(no shared modules)"
        return (f"AdapterComparison({len(t)} shared modules, side={self.side!r}: "
                f"median φ(1,1)={t['phi_top'].median():.3f}, median φ(k,k)={t['phi_k'].median():.3f} "
                f"vs random ≈{t['random_baseline'].median():.3g})")

    def _repr_html_(self) -> str:
        return f"<b>{self.__repr__()}</b>" + self.table.to_html(index=False, float_format="%.4g")


def _directions(f: LoraFactors, side: str) -> tuple[torch.Tensor, int]:
    """Orthonormal singular directions of ΔW with σ above the factors' rounding level (the
    numerical-rank rule max(m, n) · eps · σ₁), as columns (d × k), and k."""
    U, S, Vh = lowrank_svd(f.B, f.A, f.scaling)
    eps = torch.finfo(f.A.dtype).eps if f.A.dtype.is_floating_point else 1e-7
    keep = int((S > S[0] * max(U.shape[0], Vh.shape[1]) * eps).sum()) if S.numel() else 0
    return (Vh[:keep].T if side == "right" else U[:, :keep]), keep


def compare_adapters(model_a: nn.Module, model_b: nn.Module, adapter_a: str | None = None,
                     adapter_b: str | None = None, *, side: str = "right") -> AdapterComparison:
    """φ(i, j) = ‖U_a[:, :i]ᵀ U_b[:, :j]‖²_F / min(i, j) for every module both adapters adapt.

    Pass the same model twice with two adapter names to compare adapters living on one model.
    φ ≈ 1 means the top directions coincide; random subspaces give about max(i, j) / d.
    Directions with zero singular value (an untrained B = 0) are dropped; φ is NaN for a zero ΔW.
    """
    if side not in ("right", "left"):
        raise AdapterError(f"side = {side!r} is not a side of ΔW.",
                           "pass side='right' (input space, the paper's choice) or side='left'")
    with torch.no_grad():
        fa = {f.name: f for f in lora_factors(model_a, adapter_a)}
        fb = {f.name: f for f in lora_factors(model_b, adapter_b)}
        grids, rows = {}, []
        for name in (n for n in fa if n in fb):
            _check_2d(fa[name])
            _check_2d(fb[name])
            (Ua, ka), (Ub, kb) = _directions(fa[name], side), _directions(fb[name], side)
            if Ua.shape[0] != Ub.shape[0]:
                raise AdapterError(f"Module {name!r} has ΔW of shape {fa[name].shape} in one adapter "
                                   f"and {fb[name].shape} in the other.",
                                   "compare adapters trained on the same base model")
            grid = subspace_similarity_grid(Ua, Ub) if ka and kb else torch.full((1, 1), math.nan)
            grids[name] = grid
            k = min(ka, kb)
            rows.append(dict(name=name, layer=layer_index(name), module_type=module_type(name),
                             r_a=fa[name].A.shape[0], r_b=fb[name].A.shape[0],
                             phi_top=float(grid[0, 0]),
                             phi_k=float(grid[k - 1, k - 1]) if k else math.nan,
                             phi_mean=float(grid.mean()),
                             random_baseline=(max(k, 1) / Ua.shape[0])))
    cols = ["name", "layer", "module_type", "r_a", "r_b", "phi_top", "phi_k", "phi_mean",
            "random_baseline"]
    table = pd.DataFrame(rows, columns=cols)
    table["layer"] = table["layer"].astype("Int64")
    return AdapterComparison(side, grids, table, tuple(n for n in fa if n not in fb),
                             tuple(n for n in fb if n not in fa))


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
            f"Adapter {adapter!r} is a DoRA adapter: its learned magnitude rescales the columns of "
            "W + ΔW, so cutting ΔW = s·B·A alone does not give an equivalent lower-rank adapter.",
            "merge it (lora_lab.merged_copy) and analyse W_merged − W with "
            "lora_lab.core.randomized.randomized_svd, or compress a plain LoRA adapter")
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
    import peft

    if isinstance(model, peft.PeftModel):
        model.add_adapter(name, config)
    else:  # a transformers model with peft integration
        model.add_adapter(config, adapter_name=name)


def _lora_modules(model: nn.Module) -> dict:
    out = {}
    for full, module in model.named_modules():
        if isinstance(getattr(module, "lora_A", None), nn.ModuleDict):
            out[full.removeprefix("base_model.model.")] = module
    return out


def _copy_modules_to_save(model: nn.Module, source: str, target: str) -> None:
    """Carry trained full copies (``modules_to_save``, e.g. an lm_head) over to the new adapter."""
    for module in model.modules():
        saved = getattr(module, "modules_to_save", None)
        if isinstance(saved, nn.ModuleDict) and source in saved and target in saved:
            saved[target].load_state_dict(saved[source].state_dict())


def _install(model: nn.Module, factors: list, adapter: str, new_name: str, rank: int) -> list:
    """Write the truncated factors into adapter ``new_name``; return the per-module report rows."""
    modules, rows = _lora_modules(model), []
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
    Refused: DoRA adapters, ``rank`` ≥ the current r, merged models.
    """
    adapter = _resolved_name(model, adapter)
    cfg = _peft_lora_config(model, adapter)
    with torch.no_grad():
        factors = list(lora_factors(model, adapter))
        new_name = new_name if new_name is not None else f"{adapter}_r{rank}"
        _refuse(cfg, factors, adapter, rank, new_name, model)
        for f in factors:
            _check_2d(f)
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
