"""The weight histogram record against numpy: counts, bin centres and the scaled code levels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lora_lab.core.histogram import WeightHistogram, histogram_with_levels


def numpy_block_absmax(w: np.ndarray, blocksize: int) -> np.ndarray:
    """max |w| over each run of ``blocksize`` flattened values (last block zero-padded)."""
    flat = np.abs(w.reshape(-1))
    flat = np.concatenate([flat, np.zeros((-flat.size) % blocksize, dtype=flat.dtype)])
    return flat.reshape(-1, blocksize).max(axis=1)


@pytest.mark.parametrize("shape,blocksize,bins", [((96, 64), 64, 50), ((33, 17), 128, 7)])
def test_histogram_and_levels_equal_numpy(shape, blocksize, bins):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(2)) * 0.02
    code = torch.linspace(-1, 1, 16)
    h = histogram_with_levels(w, code, blocksize, bins, scheme="lin", name="w")
    x = w.numpy().reshape(-1)
    lo, hi = float(x.min()), float(x.max())
    width = (hi - lo) / bins
    assert isinstance(h, WeightHistogram) and h.numel == x.size and h.counts.sum() == x.size
    assert h.width == pytest.approx(width, rel=1e-12)
    np.testing.assert_allclose(h.centers, lo + width * (np.arange(bins) + 0.5), rtol=1e-12)
    np.testing.assert_allclose(h.edges, np.linspace(lo, hi, bins + 1), rtol=1e-9, atol=1e-12)
    ref, _ = np.histogram(x, bins=bins, range=(lo, hi))
    # histc bins in fp32, np.histogram in fp64: a value on an edge may fall either side
    assert np.abs(h.counts - ref).sum() <= 2
    # torch's median of an even count is the lower middle value
    absmax = np.sort(numpy_block_absmax(x, blocksize))
    scale = absmax[(len(absmax) - 1) // 2]
    assert h.scale == pytest.approx(float(scale), rel=1e-7)
    np.testing.assert_allclose(h.levels, code.double().numpy() * h.scale, rtol=1e-15)
    assert (h.scheme, h.blocksize, h.name) == ("lin", blocksize, "w")
    assert "w: " in repr(h) and f"{x.size:,} weights" in repr(h)


def test_constant_weight_has_unit_bin_width():
    h = histogram_with_levels(torch.full((8, 8), 0.5), torch.tensor([-1.0, 0.0, 1.0]), 64, 4)
    assert h.width == 1.0 and h.counts.sum() == 64 and h.scale == 0.5
    np.testing.assert_array_equal(h.levels, [-0.5, 0.0, 0.5])
