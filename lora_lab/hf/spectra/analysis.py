"""Spectra of a model's LoRA updates: per-module analysis and the comparison of two adapters.

Everything here reads the model through :func:`lora_lab.hf.adapters.factors.lora_factors`, which
gives each module's ΔW = s · B · A (B: out × r, A: r × in) as factors; the math is in
:mod:`lora_lab.core.spectrum`.

* :func:`adapter_spectra` — one :class:`~lora_lab.core.spectrum.Spectrum` per adapted module, with a
  table (effective rank, stable rank, k for 90% / 99% energy, …).  A LoRA module's spectrum comes
  from the factors and never forms ΔW.  A **DoRA** module (Liu et al. 2024, §4) computes
  W' = m · (W + s·B·A) / ‖W + s·B·A‖_c: its true update W' − W is full rank, so its spectrum is the
  dense SVD of W' − W (magnitude included), marked :data:`DORA_NOTE` in every table and figure.
* :func:`compare_adapters` — subspace similarity φ per module (LoRA paper §7.2): by default the
  paper's, from the right singular vectors of A; ``basis="delta"`` uses ΔW's instead.

Compressing an adapter to a lower rank is :func:`lora_lab.hf.spectra.compress.compress_adapter`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

from ...core.spectrum import (
    Spectrum,
    lowrank_svd,
    lowrank_svdvals,
    singular_directions,
    subspace_similarity_grid,
)
from ...errors import AdapterError
from .._peft import active_name
from ..adapters.factors import LoraFactors, check_matrix, lora_factors
from ..model.inspect import layer_index, module_type

__all__ = ["AdapterSpectra", "AdapterComparison", "adapter_spectra", "spectra_from_factors",
           "compare_adapters", "DORA_NOTE", "DORA_FACTORS_NOTE", "DORA_PHI_NOTE"]

SPECTRA_COLUMNS = ["name", "layer", "module_type", "out", "in", "r", "scaling", "top_sigma",
                   "effective_rank", "stable_rank", "k90", "k99", "dora"]

DORA_NOTE = "DoRA: true ΔW = W' − W incl. magnitude (full rank)"
"""The note on a DoRA module's spectrum read from a model: the dense spectrum of W' − W."""
DORA_FACTORS_NOTE = "DoRA: s·B·A only, magnitude left out (not the true ΔW)"
"""The note on a DoRA module's spectrum of the direction update s·B·A alone: from a saved file (no
base weight at hand), or asked for with ``adapter_spectra(..., dora="factors")``."""
DORA_PHI_NOTE = "DoRA: φ of the factors (direction update), magnitude not included"
"""The note on a comparison where either adapter is DoRA in some module."""


# ----------------------------------------------------------------------------- adapter_spectra
@dataclass(frozen=True, eq=False)
class AdapterSpectra:
    """The spectrum of every adapted module of one adapter.

    ``spectra``: module name → :class:`Spectrum` (of ΔW = s·B·A, out × in; for DoRA modules the
    true W' − W, with ``note`` = :data:`DORA_NOTE`), in model order.  ``ranks``, ``scalings``:
    module name → r and s.  ``table`` / :meth:`to_frame`: one row per module with the columns in
    ``SPECTRA_COLUMNS`` (``dora``: True where the spectrum carries a DoRA note).
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
                             k90=s.rank_for_energy(0.9), k99=s.rank_for_energy(0.99),
                             dora=s.note.startswith("DoRA")))
        frame = pd.DataFrame(rows, columns=SPECTRA_COLUMNS)
        frame["layer"] = frame["layer"].astype("Int64")
        return frame

    @property
    def table(self) -> pd.DataFrame:
        return self.to_frame()

    @property
    def notes(self) -> list:
        """The distinct notes of the spectra, e.g. ``[DORA_NOTE]`` for a DoRA adapter; [] for LoRA."""
        return sorted({s.note for s in self.spectra.values() if s.note})

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
        notes = "".join(f"; {int(t['dora'].sum())} modules {n}" for n in self.notes)
        return (f"AdapterSpectra({self.adapter!r}: {len(t)} modules, r={sorted(set(t['r']))}, "
                f"effective rank {t['effective_rank'].min():.2f}–{t['effective_rank'].max():.2f} "
                f"(median {t['effective_rank'].median():.2f}), k90 median {t['k90'].median():g}"
                f"{notes})")

    def _repr_html_(self) -> str:
        return f"<b>{self.__repr__()}</b>" + self.to_frame().to_html(index=False, float_format="%.4g")


def _spectrum(f, dora: str = "true") -> Spectrum:
    """One module's spectrum: from the factors for LoRA; dense W' − W for DoRA with a base weight."""
    check_matrix(f)
    if getattr(f, "use_dora", False):
        if dora == "true" and getattr(f, "weight", None) is not None:
            return Spectrum.from_matrix(f.true_delta(), f.name, DORA_NOTE)
        note = DORA_FACTORS_NOTE
    else:
        note = ""
    shape = (f.B.shape[0], f.A.shape[1])
    return Spectrum(lowrank_svdvals(f.B, f.A, f.scaling), shape, f.name, note)


def spectra_from_factors(factors, adapter: str | None = None, *, dora: str = "true") -> AdapterSpectra:
    """:class:`AdapterSpectra` from any iterable of objects with ``name, A, B, scaling`` (and
    ``use_dora``, ``weight``, ``magnitude`` for DoRA, as :class:`LoraFactors` has them).
    ``dora``: see :func:`adapter_spectra`."""
    if dora not in ("true", "factors"):
        raise AdapterError(f"dora = {dora!r} is not a choice of DoRA spectrum.",
                           "pass dora='true' (W' − W, magnitude included) or dora='factors' "
                           "(s·B·A only, marked as such)")
    spectra, ranks, scalings = {}, {}, {}
    for f in factors:
        spectra[f.name] = _spectrum(f, dora)
        ranks[f.name], scalings[f.name] = int(f.A.shape[0]), float(f.scaling)
    return AdapterSpectra(adapter, spectra, ranks, scalings)


def adapter_spectra(model, adapter: str | None = None, *, dora: str = "true") -> AdapterSpectra:
    """Spectrum of ΔW for every module carrying LoRA adapter ``adapter`` (active if None).

    LoRA: ΔW = s·B·A, from the factors in O((out + in) · r²) per module, in float64.
    DoRA (Liu et al. 2024, §4): the layer computes W' = m · (W + s·B·A) / ‖W + s·B·A‖_c, so the
    spectrum is of the true update W' − W = (g − 1) ⊙ W + g ⊙ s·B·A (g = m / ‖W + s·B·A‖_c),
    magnitude included.  It is full rank, so it takes a dense SVD, O(out · in · min(out, in)) per
    module (thousands of times the factored cost at LLM sizes), and each such spectrum carries
    ``note`` = :data:`DORA_NOTE`.
    ``dora="factors"`` gives DoRA modules the cheap spectrum of s·B·A instead, marked
    :data:`DORA_FACTORS_NOTE`: the direction update alone, not what the layer adds.

    ``model`` may also be a saved adapter folder: its factors are then read from the file alone
    (:func:`lora_lab.hf.adapters.factors.saved_lora_factors`), without loading any base model.  A
    saved DoRA adapter then has no base weight: its spectra are of s·B·A and say so
    (:data:`DORA_FACTORS_NOTE`).  Nothing on the model changes.
    """
    if isinstance(model, (str, os.PathLike)):
        from ..adapters.factors import saved_lora_factors

        return spectra_from_factors(saved_lora_factors(model), adapter or "default", dora=dora)
    with torch.no_grad():
        return spectra_from_factors(lora_factors(model, adapter, with_base=dora == "true"),
                                    active_name(model, adapter), dora=dora)


# ----------------------------------------------------------------------------- compare_adapters
@dataclass(frozen=True, eq=False)
class AdapterComparison:
    """Subspace similarity φ between two adapters, module by module (LoRA paper §7.2).

    ``grids``: module name → (k_a × k_b) tensor with φ(i, j) for the top i and top j singular
    directions.  ``side``: ``"right"`` (input space, as in the paper) or ``"left"`` (output space).
    ``basis``: whose singular vectors, in whose order — ``"factor"`` (the paper's: those of A for the
    right side, of B for the left) or ``"delta"`` (those of ΔW = s·B·A).
    ``table``: per module φ(1, 1), φ(k, k) for k = min(k_a, k_b), the grid mean, the random
    baseline k / d, and ``dora`` (either adapter is DoRA there: φ is then of its direction factors;
    the magnitude does not enter φ).  ``only_in_a`` / ``only_in_b``: modules the other adapter does
    not adapt.
    """

    side: str
    grids: dict
    table: pd.DataFrame
    only_in_a: tuple
    only_in_b: tuple
    basis: str = "factor"

    def to_frame(self) -> pd.DataFrame:
        return self.table

    @property
    def notes(self) -> list:
        """``[DORA_PHI_NOTE]`` when a module is DoRA in either adapter, else []."""
        dora = "dora" in self.table.columns and bool(self.table["dora"].fillna(False).any())
        return [DORA_PHI_NOTE] if dora else []

    def __repr__(self) -> str:
        t = self.table
        if t.empty:
            return "AdapterComparison(no shared modules)"
        dora = f"; {int(t['dora'].sum())} modules {DORA_PHI_NOTE}" if self.notes else ""
        return (f"AdapterComparison({len(t)} shared modules, side={self.side!r}, "
                f"basis={self.basis!r}: median φ(1,1)={t['phi_top'].median():.3f}, "
                f"median φ(k,k)={t['phi_k'].median():.3f} vs random ≈"
                f"{t['random_baseline'].median():.3g}{dora})")

    def _repr_html_(self) -> str:
        return f"<b>{self.__repr__()}</b>" + self.table.to_html(index=False, float_format="%.4g")


def _directions(f: LoraFactors, side: str, basis: str) -> torch.Tensor:
    """Orthonormal singular directions as columns (d × k), sorted, rounding-level ones dropped.

    ``basis="factor"`` (LoRA paper §7.2): right singular vectors of A (side right) or left ones of
    B (side left), ordered by that factor's singular values.  ``basis="delta"``: those of
    ΔW = s·B·A, ordered by ΔW's singular values; the same rule max(m, n) · eps · σ₁ drops the
    directions with σ at rounding level (an untrained B = 0 leaves none)."""
    if basis == "factor":
        return singular_directions(f.A if side == "right" else f.B, side)
    U, S, Vh = lowrank_svd(f.B, f.A, f.scaling)
    eps = torch.finfo(f.A.dtype).eps if f.A.dtype.is_floating_point else 1e-7
    keep = int((S > S[0] * max(U.shape[0], Vh.shape[1]) * eps).sum()) if S.numel() else 0
    return Vh[:keep].T if side == "right" else U[:, :keep]


def _check_choice(side: str, basis: str) -> None:
    if side not in ("right", "left"):
        raise AdapterError(f"side = {side!r} is not a side of ΔW.",
                           "pass side='right' (input space, the paper's choice) or side='left'")
    if basis not in ("factor", "delta"):
        raise AdapterError(f"basis = {basis!r} is not a basis for φ.",
                           "pass basis='factor' (the paper's: singular vectors of A) or "
                           "basis='delta' (singular vectors of ΔW = s·B·A)")


def _refuse_dora_delta(name: str, fa: LoraFactors, fb: LoraFactors, basis: str) -> None:
    if basis == "delta" and (fa.use_dora or fb.use_dora):
        raise AdapterError(
            f"Module {name!r} is DoRA in one of the adapters: its true ΔW = W' − W includes the "
            "learned magnitude and is full rank, so 'the top directions of ΔW' are not those of "
            "s·B·A.", "compare with basis='factor' (the paper's φ, from A: the direction update), "
            "or look at the true spectrum with adapter_spectra(model)")


def compare_adapters(model_a: nn.Module, model_b: nn.Module, adapter_a: str | None = None,
                     adapter_b: str | None = None, *, side: str = "right",
                     basis: str = "factor") -> AdapterComparison:
    """φ(i, j) = ‖U_a[:, :i]ᵀ U_b[:, :j]‖²_F / min(i, j) for every module both adapters adapt.

    LoRA paper §7.2 (Hu et al. 2021): φ(A_1, A_2, i, j) = ‖U_{A_1}^iᵀ U_{A_2}^j‖²_F / min(i, j),
    where U_A is the right-singular unitary matrix of the adapter's A (r × in) and U_A^i its columns
    for the top i singular values *of A*.  That is ``basis="factor"`` (the default; with
    ``side="left"``, the left singular vectors of B).  ``basis="delta"`` takes the singular vectors
    of ΔW = s·B·A, ordered by ΔW's singular values: both span the same space when B has full column
    rank, so φ(r_a, r_b) agrees, but below that the two orders differ and so does φ(i, j).  The
    paper's order depends on how training split the update between B and A (B·M and M⁻¹·A give the
    same ΔW but reorder A's directions); the ΔW order depends on ΔW alone.

    Pass the same model twice with two adapter names to compare adapters living on one model.
    φ ≈ 1 means the top directions coincide; random subspaces give about max(i, j) / d.
    Directions with rounding-level singular value are dropped.  With ``basis="delta"`` an
    untrained adapter (B = 0) has none and φ is NaN; the paper's φ then compares A's random init.
    DoRA adapters compare by their factors only (the magnitude is not a direction);
    ``basis="delta"`` refuses them.
    """
    _check_choice(side, basis)
    with torch.no_grad():
        fa = {f.name: f for f in lora_factors(model_a, adapter_a)}
        fb = {f.name: f for f in lora_factors(model_b, adapter_b)}
        grids, rows = {}, []
        for name in (n for n in fa if n in fb):
            check_matrix(fa[name])
            check_matrix(fb[name])
            _refuse_dora_delta(name, fa[name], fb[name], basis)
            Ua, Ub = _directions(fa[name], side, basis), _directions(fb[name], side, basis)
            ka, kb = Ua.shape[1], Ub.shape[1]
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
                             random_baseline=(max(k, 1) / Ua.shape[0]),
                             dora=fa[name].use_dora or fb[name].use_dora))
    cols = ["name", "layer", "module_type", "r_a", "r_b", "phi_top", "phi_k", "phi_mean",
            "random_baseline", "dora"]
    table = pd.DataFrame(rows, columns=cols)
    table["layer"] = table["layer"].astype("Int64")
    return AdapterComparison(side, grids, table, tuple(n for n in fa if n not in fb),
                             tuple(n for n in fb if n not in fa), basis)
