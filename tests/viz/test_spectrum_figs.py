"""The spectrum figures hold the data they claim to show (read back from fig.data)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lora_lab.core.spectrum import Spectrum, subspace_similarity_grid
from lora_lab.hf.spectra.analysis import AdapterComparison, spectra_from_factors
from lora_lab.viz.spectrum import (phi_figure, spectrum_evolution_figure, spectrum_figure,
                                   spectrum_heatmap)

TYPES = ["q_proj", "v_proj", "up_proj"]


@pytest.fixture
def spectra():
    """An adapter of 3 layers × 3 module types from random factors with different ranks in use."""
    factors = []
    for layer in range(3):
        for j, t in enumerate(TYPES):
            used = 1 + layer + j                        # the number of nonzero directions
            B = torch.randn(24, 8)
            B[:, used:] = 0
            factors.append(SimpleNamespace(name=f"model.layers.{layer}.x.{t}", B=B,
                                           A=torch.randn(8, 16), scaling=2.0))
    return spectra_from_factors(factors, "demo")


def test_spectrum_figure_values_and_energy(spectra):
    sp = spectra["model.layers.2.x.up_proj"]          # 5 nonzero σ of 8
    fig = spectrum_figure(sp, k=2)
    bars, energy = fig.data
    np.testing.assert_allclose(bars.y, sp.numpy()[:5])  # zeros are left off the log axis
    np.testing.assert_array_equal(bars.x, np.arange(1, 6))
    np.testing.assert_allclose(energy.y, np.cumsum(sp.numpy() ** 2) / (sp.numpy() ** 2).sum())
    assert fig.layout.yaxis.type == "log" and energy.yaxis == "y2"
    assert f"{sp.energy_at(2):.1%}" in fig.layout.title.text


def test_heatmap_places_metric_by_layer_and_type(spectra):
    fig = spectrum_heatmap(spectra, "effective_rank")
    (heat,) = fig.data
    assert list(heat.x) == TYPES and list(heat.y) == ["0", "1", "2"]
    table = spectra.table
    for _, row in table.iterrows():
        z = heat.z[int(row["layer"])][TYPES.index(row["module_type"])]
        assert z == pytest.approx(row["effective_rank"])
    energy = spectrum_heatmap(spectra, "energy_at_k", k=2).data[0]
    sp = spectra["model.layers.1.x.v_proj"]
    assert energy.z[1][1] == pytest.approx(sp.energy_at(2))
    assert energy.z[0][0] == pytest.approx(1.0)        # one direction only: all kept
    with pytest.raises(ValueError, match="needs k"):
        spectrum_heatmap(spectra, "energy_at_k")
    with pytest.raises(ValueError, match="choose from"):
        spectrum_heatmap(spectra, "nonsense")


def test_phi_figure_and_comparison_heatmap():
    U1 = torch.linalg.qr(torch.randn(40, 4)).Q
    U2 = torch.linalg.qr(torch.cat([U1[:, :2], torch.randn(40, 6)], 1)).Q
    grid = subspace_similarity_grid(U1, U2)
    import pandas as pd

    table = pd.DataFrame([dict(name="model.layers.0.q_proj", layer=0, module_type="q_proj",
                               phi_top=float(grid[0, 0]), phi_k=float(grid[3, 3]))])
    comp = AdapterComparison("right", {"model.layers.0.q_proj": grid}, table, (), ())
    fig = phi_figure((comp, "model.layers.0.q_proj"))
    (heat,) = fig.data
    np.testing.assert_allclose(np.asarray(heat.z), grid.numpy())
    assert heat.z[0][0] == pytest.approx(1.0) and (heat.zmin, heat.zmax) == (0, 1)
    assert len(heat.x) == 8 and len(heat.y) == 4 and "q_proj" in fig.layout.title.text
    summary = spectrum_heatmap(comp, "phi_k").data[0]
    assert summary.z[0][0] == pytest.approx(float(grid[3, 3]))


def test_evolution_figure_tracks_snapshots():
    torch.manual_seed(0)
    B, A = torch.randn(30, 4), torch.randn(4, 20)
    snaps = [(step, Spectrum.from_factors(B * (step + 1), A)) for step in (20, 0, 10)]  # unsorted
    fig = spectrum_evolution_figure(snaps, top=3)
    sigmas, erank = fig.data[:3], fig.data[3]
    assert len(fig.data) == 4
    np.testing.assert_array_equal(sigmas[0].x, [0, 10, 20])
    ordered = [sp for _, sp in sorted(snaps, key=lambda p: p[0])]
    np.testing.assert_allclose(sigmas[2].y, [sp.values[2] for sp in ordered])
    np.testing.assert_allclose(erank.y, [sp.effective_rank for sp in ordered])
    assert erank.yaxis == "y2"
