"""The quantization figures hold the numbers of the records they are built from."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lora_lab.core.histogram import WeightHistogram
from lora_lab.core.quant import absmax_roundtrip, block_absmax
from lora_lab.core.lowrank import recover_lowrank
from lora_lab.hf.quant import roundtrip as hq
from lora_lab.hf.quant import scan as hs
from lora_lab.viz import quant as vq


@pytest.fixture(scope="module")
def scan():
    g = torch.Generator().manual_seed(0)
    sd = {f"model.layers.{i}.{m}.weight": torch.randn(48, 64, generator=g) * (1 + i)
          for i in range(3) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}
    sd["model.layers.1.mlp.down_proj.weight"][0, 0] = 60.0  # one bad block
    return hs.scan_quantization(sd, schemes=("nf4", "fp4", "int8"), progress=False)


def test_heatmap_is_the_table_pivoted_per_scheme(scan):
    fig = vq.error_heatmap(scan)
    assert [tr.name for tr in fig.data] == ["nf4", "fp4", "int8"]
    assert [tr.visible for tr in fig.data] == [True, False, False]
    t = scan.table
    for tr in fig.data:
        assert list(tr.x) == ["q_proj", "v_proj", "down_proj"] and list(tr.y) == [0, 1, 2]
        for i, layer in enumerate(tr.y):
            for j, module in enumerate(tr.x):
                row = t[(t.scheme == tr.name) & (t.layer == layer) & (t.module == module)].iloc[0]
                assert tr.z[i][j] == pytest.approx(row.rel_error)
                assert tr.customdata[i][j] == row["name"]
    nf4 = np.array(fig.data[0].z)
    assert np.unravel_index(nf4.argmax(), nf4.shape) == (1, 2)  # the planted outlier's block
    assert len(fig.layout.updatemenus[0].buttons) == 3


def test_bars_are_means_over_layers(scan):
    fig = vq.scheme_bars(scan, metric="snr_db")
    t = scan.table
    for tr in fig.data:
        want = [t[(t.scheme == tr.name) & (t.module == m)].snr_db.mean() for m in tr.x]
        assert list(tr.y) == pytest.approx(want)
    y = {tr.name: np.array(tr.y) for tr in fig.data}
    assert (y["int8"] > y["nf4"]).all() and (y["nf4"] > y["fp4"]).all()


def test_blocksize_figure_orders_points_and_splits_double_quant():
    w = torch.randn(128, 128, generator=torch.Generator().manual_seed(1))
    errs = [hq.quant_error(w, "nf4", bs, dq) for bs in (256, 64, 128) for dq in (False, True)]
    fig = vq.blocksize_figure(errs)
    assert [tr.name for tr in fig.data] == ["nf4", "nf4+dq"]
    for tr, dq in zip(fig.data, (False, True)):
        assert list(tr.x) == [64, 128, 256]
        want = [e.rel_error for e in sorted(errs, key=lambda e: e.blocksize) if e.double_quant == dq]
        assert list(tr.y) == pytest.approx(want)
    assert fig.layout.xaxis.type == "log"


def test_histogram_counts_every_weight_and_draws_nf4_levels():
    w = torch.randn(96, 64, generator=torch.Generator().manual_seed(2))
    fig = vq.weight_histogram(hq.weight_histogram_data(w, "nf4", blocksize=64, bins=50))
    bars, lines = fig.data
    assert sum(bars.y) == w.numel() and len(bars.x) == 50
    assert bars.x[0] >= w.min().item() and bars.x[-1] <= w.max().item()
    levels = np.array(lines.x[0::3])
    want = hq.code_points("nf4").numpy() * block_absmax(w, 64).median().item()
    assert len(levels) == 16 and levels == pytest.approx(want, rel=1e-6)
    assert levels.min() == pytest.approx(-block_absmax(w, 64).median().item(), rel=1e-6)


def test_histogram_figure_data_equal_a_direct_computation():
    """The figure's arrays, computed here with torch.histc and the code points (the oracle)."""
    w = torch.randn(40, 72, generator=torch.Generator().manual_seed(7)) * 0.05
    fig = vq.weight_histogram(hq.weight_histogram_data(w, "fp4", blocksize=128, bins=33, name="up"))
    lo, hi = w.min().item(), w.max().item()
    counts = torch.histc(w.reshape(-1), bins=33, min=lo, max=hi).numpy()
    width = (hi - lo) / 33
    scale = block_absmax(w, 128).median().item()
    levels = hq.code_points("fp4").double().numpy() * scale
    bars, lines = fig.data
    np.testing.assert_array_equal(bars.y, counts)
    np.testing.assert_array_equal(bars.x, lo + width * (np.arange(33) + 0.5))
    assert bars.width == width and bars.name == "up"
    np.testing.assert_array_equal(lines.x[0::3], levels)
    np.testing.assert_array_equal(lines.x[1::3], levels)
    np.testing.assert_array_equal(lines.y[1::3], np.full(len(levels), counts.max()))
    assert np.isnan(lines.x[2::3]).all() and np.isnan(lines.y[2::3]).all()
    assert lines.name == f"fp4 code × median absmax ({scale:.3g})"
    assert fig.layout.title.text == (f"up: {w.numel():,} weights and the {len(levels)} fp4 levels "
                                     "(blocksize 128)")


def test_histogram_draws_a_hand_made_record():
    """viz needs only the record: two bins, three levels."""
    h = WeightHistogram(centers=np.array([-0.5, 0.5]), width=1.0, counts=np.array([3.0, 5.0]),
                        levels=np.array([-1.0, 0.0, 1.0]), scale=1.0, numel=8, scheme="toy",
                        blocksize=4, name="w")
    bars, lines = vq.weight_histogram(h).data
    assert list(bars.x) == [-0.5, 0.5] and list(bars.y) == [3.0, 5.0] and bars.width == 1.0
    assert list(lines.x[0::3]) == [-1.0, 0.0, 1.0] and list(lines.y[1::3]) == [5.0] * 3


def test_recovery_figure_plots_svd_and_loftq_errors():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 8, generator=g) @ torch.randn(8, 96, generator=g) + 0.1 * torch.randn(64, 96, generator=g)
    res = recover_lowrank(w, lambda x: absmax_roundtrip(x, 4, 64), ranks=(2, 4, 8), loftq_iters=2,
                          scheme="int4")
    fig = vq.recovery_figure(res)
    svd, lq = fig.data
    assert list(svd.x) == [0, 2, 4, 8]
    assert list(svd.y) == pytest.approx([res.quant_rel_error, *res.svd_rel_errors])
    assert list(lq.y) == pytest.approx([res.quant_rel_error, *res.loftq_rel_errors])
    assert lq.line.dash == "dash" and all(a >= b for a, b in zip(svd.y, lq.y))
