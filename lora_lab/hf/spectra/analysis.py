"""Spectra of a model's LoRA updates: per-module analysis and the comparison of two adapters.

Everything here reads the model through :func:`lora_lab.hf.adapters.factors.lora_factors`, which
gives each module's ΔW = s · B · A (B: out × r, A: r × in) as factors; the math is in
:mod:`lora_lab.core.spectrum` and never forms ΔW.

* :func:`adapter_spectra` — one :class:`~lora_lab.core.spectrum.Spectrum` per adapted module, with a
  table (effective rank, stable rank, k for 90% / 99% energy, …).
* :func:`compare_adapters` — subspace similarity φ per module (LoRA paper §7.2).

Compressing an adapter to a lower rank is :func:`lora_lab.hf.spectra.compress.compress_adapter`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

from ...core.spectrum import Spectrum, lowrank_svd, lowrank_svdvals, subspace_similarity_grid
from ...errors import AdapterError
from .._peft import active_name
from ..adapters.factors import LoraFactors, check_matrix, lora_factors
from ..model.inspect import layer_index, module_type

__all__ = ["AdapterSpectra", "AdapterComparison", "adapter_spectra", "spectra_from_factors",
           "compare_adapters"]

SPECTRA_COLUMNS = ["name", "layer", "module_type", "out", "in", "r", "scaling", "top_sigma",
                   "effective_rank", "stable_rank", "k90", "k99"]


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
        check_matrix(f)
        shape = (f.B.shape[0], f.A.shape[1])
        spectra[f.name] = Spectrum(lowrank_svdvals(f.B, f.A, f.scaling), shape, f.name)
        ranks[f.name], scalings[f.name] = int(f.A.shape[0]), float(f.scaling)
    return AdapterSpectra(adapter, spectra, ranks, scalings)


def adapter_spectra(model, adapter: str | None = None) -> AdapterSpectra:
    """Spectrum of ΔW = s·B·A for every module carrying LoRA adapter ``adapter`` (active if None).

    ``model`` may also be a saved adapter folder: its factors are then read from the file alone
    (:func:`lora_lab.hf.adapters.factors.saved_lora_factors`), without loading any base model.
    O((out + in) · r²) per module, in float64; nothing on the model changes.  For DoRA adapters this
    is the spectrum of the low-rank direction update B·A (the learned magnitude is not included).
    """
    if isinstance(model, (str, os.PathLike)):
        from ..adapters.factors import saved_lora_factors

        return spectra_from_factors(saved_lora_factors(model), adapter or "default")
    with torch.no_grad():
        return spectra_from_factors(lora_factors(model, adapter), active_name(model, adapter))


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
            check_matrix(fa[name])
            check_matrix(fb[name])
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
