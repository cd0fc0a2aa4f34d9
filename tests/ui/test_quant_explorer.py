"""QuantExplorer without a front end: set the controls, read ``result``, ``memory`` and fig.data, and
check them against the scan table, hand computations and bitsandbytes' own ordering (NF4 < FP4)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import lora_lab as ll
from lora_lab.ui.quant_explorer import QuantExplorer


@pytest.fixture(scope="module")
def tiny():
    return ll.load_model("builtin:tiny")[0]


def heat_z(explorer) -> np.ndarray:
    return np.array(explorer.heatmap.figure.data[0].z, dtype=float)


def test_scheme_and_blocksize_change_heatmap_and_numbers(tiny):
    e = QuantExplorer(tiny)
    nf4, z_nf4 = e.result, heat_z(e)
    t = nf4.table
    # the heatmap is the table, pivoted layers × module type
    want = t.pivot_table(index="layer", columns="module", values="rel_error")
    want = want.reindex(columns=list(dict.fromkeys(t["module"])))
    np.testing.assert_allclose(z_nf4, want.to_numpy(dtype=float))

    e.scheme.value = "fp4"
    fp4 = e.result
    assert fp4.schemes == ("fp4",) and not np.allclose(heat_z(e), z_nf4)
    # NF4 (quantiles of N(0,1), QLoRA §3) beats FP4 on every tensor of a trained model
    assert (nf4.table["rel_error"].to_numpy() < fp4.table["rel_error"].to_numpy()).all()
    assert f"{fp4.table['rel_error'].mean():.4g}" in e.summary.value

    e.scheme.value = "nf4"
    assert e.result is nf4                                    # from the cache, not a new scan
    np.testing.assert_allclose(heat_z(e), z_nf4)
    e.blocksize.value = 256                                   # fewer absmax constants: coarser
    assert e.result.blocksize == 256
    assert e.result.table["rel_error"].mean() > t["rel_error"].mean()
    assert not np.allclose(heat_z(e), z_nf4)


def test_memory_saved_equals_hand_computation(tiny):
    e = QuantExplorer(tiny, double_quant=True)
    t = e.result.table
    fp16 = sum(2 * int(n) for n in t["numel"])
    quant = sum(int(n) * float(b) / 8 for n, b in zip(t["numel"], t["bits_per_param"]))
    m = e.memory
    assert m.fp16_bytes == fp16 and m.quant_bytes == pytest.approx(quant, rel=1e-12)
    assert m.saved_bytes == pytest.approx(fp16 - quant) and \
        m.saved_share == pytest.approx(1 - quant / fp16)
    assert m["saved_bytes"] == m.saved_bytes                # the keys of the old dict still read
    assert f"({m.saved_share:.1%})" in e.summary.value
    assert f"{quant * 8 / (fp16 / 2):.3f} bits/param" in e.summary.value
    # without double quant NF4 stores 4 bits + one fp32 absmax per 64 weights = 4.5 bits (QLoRA §3)
    e.double_quant.value = False
    assert e.memory.quant_bytes == pytest.approx(t["numel"].sum() * 4.5 / 8)
    assert e.memory.saved_bytes < m.saved_bytes             # double quant saves more


def test_module_dropdown_changes_histogram_and_detail(tiny):
    e = QuantExplorer(tiny)
    first, other = e.module.options[0], e.module.options[4]
    bars = e.histogram.figure.data[0]
    assert bars.name == first
    y0 = np.array(bars.y)
    e.module.value = other
    bars = e.histogram.figure.data[0]
    w = dict(tiny.named_parameters())[other]
    assert bars.name == other and np.array(bars.y).sum() == pytest.approx(w.numel())
    assert not (len(bars.y) == len(y0) and np.allclose(bars.y, y0))
    row = e.result.table.set_index("name").loc[other]
    assert other in e.detail.value and f"{row['rel_error']:.4g}" in e.detail.value


def test_invalid_input_shows_a_message_not_a_traceback(tiny, tiny_llama_nf4, tmp_path):
    e = QuantExplorer(tiny_llama_nf4[0])
    assert e.result is None and "already quantized" in e.error
    assert "already quantized" in e.message.value
    e.scheme.value = "fp4"                                   # still no exception
    assert e.result is None and "already quantized" in e.error
    missing = QuantExplorer(tmp_path / "nothing-here")
    assert missing.result is None and "does not exist" in missing.message.value
    odd = QuantExplorer(tiny, scheme="nf5")                  # shown, and the default scheme used
    assert "nf5" in odd.message.value and odd.result.schemes == ("nf4",)


def test_code_reproduces_the_table(tiny, capsys):
    e = QuantExplorer(tiny)
    e.scheme.value, e.blocksize.value, e.double_quant.value = "int8", 128, True
    assert e.choice == ("int8", 128, True)
    ns: dict = {}
    exec(e.code(), ns)
    pd.testing.assert_frame_equal(ns["scan"].table, e.result.table)


def test_static_fallback_shows_the_same_data(tiny):
    live, static = QuantExplorer(tiny), QuantExplorer(tiny, static=True)
    assert static.heatmap.static
    np.testing.assert_allclose(heat_z(static), heat_z(live))
    static.scheme.value = "int4"
    assert static.heatmap.figure.data[0].name == "int4"



def test_clicking_a_heatmap_cell_selects_its_module(tiny):
    from plotly.callbacks import Points

    e = QuantExplorer(tiny, static=False)
    trace = e.heatmap.figure.data[0]
    modules = list(trace.x)
    trace._dispatch_on_click(Points(point_inds=[[2, 3]], xs=[modules[3]], ys=[2],
                                    trace_name="nf4", trace_index=0), None)   # what a click sends
    t = e.result.table
    assert e.module.value == t[(t.layer == 2) & (t.module == modules[3])]["name"].item()
    assert e.histogram.figure.data[0].name == e.module.value
