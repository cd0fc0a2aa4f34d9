"""A rank cut over every module of one adapter, laid out once as arrays: pure numpy, no figures.

Cutting a LoRA update ΔW_i = s·B·A (out_i × in_i, rank r_i) to rank k keeps its top k singular
values, the best rank-k approximation (Eckart–Young).  With σ_i1 ≥ σ_i2 ≥ … the spectrum of module
i, everything a rank slider needs is a column lookup in one (modules × (R + 1)) array
E[i, k] = Σ_{j ≤ k} σ_ij² / Σ_j σ_ij² (R = the largest r_i)::

    energy at k      E[:, k]                                   (share of ‖ΔW_i‖²_F kept)
    ΔW error at k    √(1 − E[:, k])                            (‖ΔW_i − ΔW_i,k‖_F / ‖ΔW_i‖_F)
    parameters at k  Σ_i min(k, r_i) · (out_i + in_i)          (LoRA parameters after the cut)
    whole adapter    Σ_i E[i, k] ‖ΔW_i‖²_F / Σ_i ‖ΔW_i‖²_F

so a slider move costs O(modules), not a table rebuild.  Modules also sit on a layers × module-type
grid (precomputed cell indices), the picture :func:`lora_lab.viz.sweep.cut_heatmap` draws.

* :class:`CutGrid` — the arrays (build with :func:`cut_grid` or :meth:`CutGrid.from_spectra`).
* :func:`diagonal_phi` — φ(k, k) of every module for every k, from two adapters' φ grids
  (LoRA paper §7.2), in the same (modules × (R + 1)) layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

__all__ = ["CutGrid", "cut_grid", "diagonal_phi"]


@dataclass(frozen=True, eq=False)
class CutGrid:
    """Arrays for a rank cut over every module of one adapter (see the module docstring).

    ``names``: module names (model order), n of them.  ``energy``: (n × (R + 1)), column k = energy
    kept at rank k (column 0: 0, or 1 for ΔW = 0; columns past a module's r repeat its last value).
    ``ranks`` (r), ``widths`` (out + in) and ``frob2`` (‖ΔW‖²_F): (n,) per module.
    ``row_labels`` / ``col_labels``: the grid's layers (as strings, ``"-1"`` for modules outside
    the decoder layers) and module types; ``rows`` / ``cols``: (n,) each module's cell;
    ``counts``: (layers × module types) modules per cell.
    """

    names: tuple
    energy: np.ndarray
    ranks: np.ndarray
    widths: np.ndarray
    frob2: np.ndarray
    row_labels: tuple
    col_labels: tuple
    rows: np.ndarray
    cols: np.ndarray
    counts: np.ndarray

    @classmethod
    def from_spectra(cls, spectra) -> "CutGrid":
        """From an :class:`~lora_lab.hf.spectra.analysis.AdapterSpectra`: its ``spectra``
        (name → :class:`~lora_lab.core.spectrum.Spectrum`) and its ``table``'s ``name``, ``r``,
        ``layer`` (NA → −1) and ``module_type`` columns.  O(modules · R), done once."""
        table = spectra.table
        names = tuple(table["name"])
        return cut_grid(names, [spectra.spectra[n] for n in names], table["r"].to_numpy(int),
                        table["layer"].fillna(-1).astype(int).to_numpy(),
                        list(table["module_type"]))

    @property
    def max_rank(self) -> int:
        """R, the largest r of the adapter (at least 1)."""
        return self.energy.shape[1] - 1

    def _k(self, k: int) -> int:
        return int(min(max(k, 0), self.max_rank))

    def energy_at(self, k: int) -> np.ndarray:
        """(n,) per module, the share of ‖ΔW‖²_F kept at rank k (k clipped to 0..R)."""
        return self.energy[:, self._k(k)]

    def error_at(self, k: int) -> np.ndarray:
        """(n,) per module, ‖ΔW − ΔW_k‖_F / ‖ΔW‖_F = √(1 − energy)."""
        return np.sqrt(np.clip(1.0 - self.energy_at(k), 0.0, None))

    def parameters_at(self, k: int) -> int:
        """LoRA parameters after cutting to rank k: Σ min(k, r) · (out + in)."""
        return int((np.minimum(max(k, 0), self.ranks) * self.widths).sum())

    def total_energy_at(self, k: int) -> float:
        """Share of the whole adapter's Σ ‖ΔW_i‖²_F kept at rank k (1.0 for an all-zero adapter)."""
        total = self.frob2.sum()
        return float((self.energy_at(k) * self.frob2).sum() / total) if total > 0 else 1.0

    def grid(self, values) -> np.ndarray:
        """(layers × module types) array of ``values`` (n, one per module), averaged per cell; NaN
        where no module sits."""
        z = np.zeros(self.counts.shape)
        np.add.at(z, (self.rows, self.cols), np.asarray(values, dtype=float))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.counts > 0, z / np.maximum(self.counts, 1), np.nan)


def cut_grid(names: Sequence[str], spectra: Sequence, ranks: Sequence[int],
             layers: Sequence[int], module_types: Sequence[str]) -> CutGrid:
    """The :class:`CutGrid` of n modules, one entry per module in each argument.

    ``spectra``: each module's :class:`~lora_lab.core.spectrum.Spectrum` of ΔW (its
    ``cumulative_energy``, ``top`` = σ₁, ``frobenius`` = ‖ΔW‖_F and ``shape`` = (out, in) are
    read); ``ranks``: the LoRA r; ``layers``: decoder layer index (−1 for none);
    ``module_types``: e.g. ``"q_proj"``.  Grid rows are the sorted layers, columns the module
    types in first-seen order.
    """
    names = tuple(names)
    ranks = np.asarray(ranks, dtype=int)
    R = max([int(r) for r in ranks] + [1])
    energy = np.ones((len(names), R + 1))
    frob2 = np.zeros(len(names))
    for i, s in enumerate(spectra):
        c = np.asarray(s.cumulative_energy, dtype=float)   # c[j-1] = E[i, j], j = 1..len(σ)
        energy[i, 0] = 0.0 if s.top > 0 else 1.0
        energy[i, 1:len(c) + 1] = c[:R]
        energy[i, len(c) + 1:] = c[-1] if len(c) else 1.0
        frob2[i] = s.frobenius ** 2
    layers = np.asarray(layers, dtype=int)
    row_labels = tuple(sorted(set(layers.tolist())))
    col_labels = tuple(dict.fromkeys(module_types))
    rows = np.searchsorted(np.array(row_labels), layers)
    cols = np.array([col_labels.index(t) for t in module_types], dtype=int)
    counts = np.zeros((len(row_labels), len(col_labels)))
    np.add.at(counts, (rows, cols), 1)
    widths = np.array([s.shape[0] + s.shape[1] for s in spectra], dtype=int)
    return CutGrid(names, energy, ranks, widths, frob2, tuple(str(r) for r in row_labels),
                   col_labels, rows, cols, counts)


def diagonal_phi(grids: Mapping[str, object], names: Sequence[str], max_rank: int) -> np.ndarray:
    """(n × (max_rank + 1)) array: column k holds φ(k, k) of each module in ``names``.

    ``grids``: module name → its (k1 × k2) φ grid, grid[i-1, j-1] = φ(i, j) (LoRA paper §7.2; e.g.
    :attr:`~lora_lab.hf.spectra.analysis.AdapterComparison.grids`).  A k beyond a module's
    directions uses its last one: φ(min(k, k1), min(k, k2)).  NaN for modules ``grids`` lacks,
    and in column 0."""
    out = np.full((len(names), max_rank + 1), np.nan)
    for i, name in enumerate(names):
        grid = grids.get(name)
        if grid is None:
            continue
        g = np.asarray(grid, dtype=float)
        ks = np.arange(1, max_rank + 1)
        out[i, 1:] = g[np.minimum(ks, g.shape[0]) - 1, np.minimum(ks, g.shape[1]) - 1]
    return out
