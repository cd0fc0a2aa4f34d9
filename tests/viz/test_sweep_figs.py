"""The rank-cut heatmap shows the CutGrid's per-cell values, and only them."""

from __future__ import annotations

import numpy as np

from lora_lab.core.rank_cut import cut_grid
from lora_lab.core.spectrum import Spectrum
from lora_lab.viz.sweep import cut_heatmap


def test_cut_heatmap_is_the_grid_of_the_values():
    spectra = [Spectrum.from_values([3.0, 1.0], (4, 4)), Spectrum.from_values([1.0], (4, 2)),
               Spectrum.from_values([2.0], (2, 4))]
    cut = cut_grid(["a", "b", "c"], spectra, [2, 1, 1], [0, 0, 2], ["mlp", "mlp", "attn"])
    fig = cut_heatmap(cut, [0.12345, 0.5, 0.7], "energy (k=1)")
    (tr,) = fig.data
    z = np.array(tr.z, dtype=float)
    np.testing.assert_array_equal(z, [[(0.12345 + 0.5) / 2, np.nan], [np.nan, 0.7]])
    np.testing.assert_array_equal(np.array(tr.text, dtype=float), np.round(z, 3))
    assert list(tr.x) == ["mlp", "attn"] and list(tr.y) == ["0", "2"]
    assert tr.colorbar.title.text == "energy (k=1)" and fig.layout.title.text == "energy (k=1)"
    assert fig.layout.yaxis.autorange == "reversed"
    assert cut_heatmap(cut, [1, 1, 1], "x", title="t").layout.title.text == "t"
