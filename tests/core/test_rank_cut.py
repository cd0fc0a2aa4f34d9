"""The rank-cut arrays against dense SVDs of ΔW = s·B·A, and the layers × module-type grid by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lora_lab.core.rank_cut import CutGrid, cut_grid, diagonal_phi
from lora_lab.core.spectrum import Spectrum

# (name, layer, module type, out, in, r, scale): two layers, one module outside them (lm_head)
MODULES = [("model.layers.0.q_proj", 0, "q_proj", 24, 32, 4, 2.0),
           ("model.layers.0.up_proj", 0, "up_proj", 40, 32, 8, 0.5),
           ("model.layers.1.q_proj", 1, "q_proj", 24, 32, 4, 2.0),
           ("model.layers.1.up_proj", 1, "up_proj", 40, 32, 8, 0.5),
           ("lm_head", -1, "lm_head", 50, 32, 2, 1.0)]


@pytest.fixture(scope="module")
def adapter():
    """``(CutGrid, deltas)``: the grid of five random LoRA modules and their dense ΔW (float64)."""
    g = torch.Generator().manual_seed(0)
    deltas, spectra = [], []
    for i, (name, _, _, m, n, r, s) in enumerate(MODULES):
        B = torch.randn(m, r, generator=g, dtype=torch.float64) * (i + 1)
        A = torch.randn(r, n, generator=g, dtype=torch.float64)
        deltas.append(s * B @ A)
        spectra.append(Spectrum.from_factors(B, A, s, name))
    cut = cut_grid([m[0] for m in MODULES], spectra, [m[5] for m in MODULES],
                   [m[1] for m in MODULES], [m[2] for m in MODULES])
    return cut, deltas


def kept(delta, k):
    """Oracle: ‖ΔW_k‖²_F / ‖ΔW‖²_F of the truncated dense SVD (Eckart–Young)."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    dk = U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]
    return float((dk ** 2).sum() / (delta ** 2).sum()), float((delta - dk).norm() / delta.norm())


@pytest.mark.parametrize("k", [1, 2, 3, 4, 6, 8])
def test_energy_error_and_parameters_equal_dense_svd(adapter, k):
    cut, deltas = adapter
    energies, errors = zip(*(kept(d, k) for d in deltas))
    np.testing.assert_allclose(cut.energy_at(k), energies, rtol=1e-10)
    np.testing.assert_allclose(cut.error_at(k), errors, rtol=1e-7, atol=1e-7)
    frob2 = [float((d ** 2).sum()) for d in deltas]
    np.testing.assert_allclose(cut.frob2, frob2, rtol=1e-10)
    whole = sum(e * f for e, f in zip(energies, frob2)) / sum(frob2)
    assert cut.total_energy_at(k) == pytest.approx(whole, rel=1e-10)
    # LoRA parameters of the cut adapter: Σ min(k, r) · (out + in)
    assert cut.parameters_at(k) == sum(min(k, r) * (m + n) for _, _, _, m, n, r, _ in MODULES)


def test_rank_is_clipped_to_zero_and_max_rank(adapter):
    cut, _ = adapter
    assert cut.max_rank == 8 and cut.energy.shape == (len(MODULES), 9)
    np.testing.assert_array_equal(cut.energy_at(-3), np.zeros(len(MODULES)))
    np.testing.assert_array_equal(cut.energy_at(0), np.zeros(len(MODULES)))
    np.testing.assert_array_equal(cut.energy_at(99), cut.energy_at(8))
    np.testing.assert_allclose(cut.energy_at(8), 1.0, rtol=1e-12)   # every module fully kept
    np.testing.assert_allclose(cut.error_at(0), 1.0)
    assert cut.parameters_at(-1) == 0 and cut.total_energy_at(0) == 0.0
    # a module of r = 2 keeps everything from k = 2 on: its columns repeat the last value
    lm = cut.names.index("lm_head")
    assert (cut.energy[lm, 2:] == cut.energy[lm, 2]).all()


def test_grid_places_each_module_in_its_layer_and_type(adapter):
    cut, _ = adapter
    assert cut.row_labels == ("-1", "0", "1") and cut.col_labels == ("q_proj", "up_proj", "lm_head")
    values = np.arange(len(MODULES), dtype=float) + 1          # 1..5 in model order
    z = cut.grid(values)
    want = np.array([[np.nan, np.nan, 5.0], [1.0, 2.0, np.nan], [3.0, 4.0, np.nan]])
    np.testing.assert_array_equal(z, want)
    np.testing.assert_array_equal(cut.counts, np.isfinite(want).astype(float))


def test_grid_averages_modules_sharing_a_cell():
    spectra = [Spectrum.from_values([3.0, 1.0], (4, 4)), Spectrum.from_values([1.0], (4, 2)),
               Spectrum.from_values([2.0], (2, 4))]
    cut = cut_grid(["a", "b", "c"], spectra, [2, 1, 1], [0, 0, 2], ["mlp", "mlp", "attn"])
    assert cut.counts.tolist() == [[2.0, 0.0], [0.0, 1.0]]
    np.testing.assert_array_equal(cut.grid([1.0, 3.0, 7.0]), [[2.0, np.nan], [np.nan, 7.0]])
    assert cut.widths.tolist() == [8, 6, 6] and cut.ranks.tolist() == [2, 1, 1]
    # energy at 1: 9/10 for a, 1 for b and c; whole adapter (9 + 1 + 4) / (10 + 1 + 4)
    np.testing.assert_allclose(cut.energy_at(1), [0.9, 1.0, 1.0])
    assert cut.total_energy_at(1) == pytest.approx(14 / 15)
    assert cut.error_at(1)[0] == pytest.approx(math.sqrt(0.1))


def test_untrained_module_counts_as_kept():
    """B = 0 (peft's init): ΔW = 0, nothing to cut, energy 1 at every k and no error."""
    cut = cut_grid(["z"], [Spectrum.from_values([0.0, 0.0], (8, 8))], [2], [0], ["q_proj"])
    np.testing.assert_array_equal(cut.energy_at(0), [1.0])
    np.testing.assert_array_equal(cut.error_at(1), [0.0])
    assert cut.total_energy_at(1) == 1.0 and not cut.frob2.any()


def test_from_spectra_reads_the_adapter_table():
    from lora_lab.hf.adapters.factors import LoraFactors
    from lora_lab.hf.spectra.analysis import spectra_from_factors

    g = torch.Generator().manual_seed(1)
    fs = [LoraFactors(name, A=torch.randn(r, n, generator=g), B=torch.randn(m, r, generator=g),
                      scaling=s) for name, _, _, m, n, r, s in MODULES]
    spectra = spectra_from_factors(fs, "a")
    cut = CutGrid.from_spectra(spectra)
    want = cut_grid([m[0] for m in MODULES], [spectra[m[0]] for m in MODULES],
                    [m[5] for m in MODULES], [m[1] for m in MODULES], [m[2] for m in MODULES])
    for field in ("energy", "ranks", "widths", "frob2", "rows", "cols", "counts"):
        np.testing.assert_array_equal(getattr(cut, field), getattr(want, field))
    assert (cut.names, cut.row_labels, cut.col_labels) == (want.names, want.row_labels,
                                                          want.col_labels)
    for k in (1, 3, 8):
        np.testing.assert_allclose(cut.error_at(k), spectra.error_at(k).to_numpy(), rtol=1e-12)
        assert cut.parameters_at(k) == spectra.parameters_at(k)


def test_diagonal_phi_reads_the_diagonal_and_holds_the_last_direction():
    grid = torch.arange(1, 7, dtype=torch.float64).reshape(2, 3) / 10   # φ(i, j), 2 × 3
    out = diagonal_phi({"a": grid}, ["a", "missing"], 4)
    assert out.shape == (2, 5) and np.isnan(out[:, 0]).all() and np.isnan(out[1]).all()
    # k = 1: φ(1, 1); k = 2: φ(2, 2); k ≥ 3: φ(min(k, 2), min(k, 3)) = φ(2, 3), then φ(2, 3)
    np.testing.assert_allclose(out[0, 1:], [0.1, 0.5, 0.6, 0.6])
