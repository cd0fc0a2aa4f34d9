"""RankExplorer without a front end: set the slider, read traits and fig.data, check against dense
SVDs of ΔW = s·B·A."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lora_lab as ll
from lora_lab.errors import AdapterError
from lora_lab.hf.adapters.factors import lora_factors
from lora_lab.hf.spectra.analysis import adapter_spectra
from lora_lab.ui.rank_explorer import RankExplorer


def trained_like(model, r=8, name="default", seed=0):
    """Attach LoRA on q/v/down and give B random values (as if trained)."""
    spec = ll.AdapterSpec(r=r, target_modules=("q_proj", "v_proj", "down_proj"))
    model = ll.attach(model, spec, name=name)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f"lora_B.{name}." in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def dense(model, adapter):
    return {f.name: f.scaling * (f.B.double() @ f.A.double()) for f in lora_factors(model, adapter)}


def oracle(deltas, k):
    """Whole-adapter energy share, per-module errors and parameter count of a rank-k cut."""
    kept = total = 0.0
    errors, params = [], 0
    for d in deltas.values():
        s2 = torch.linalg.svdvals(d) ** 2
        kept, total = kept + float(s2[:k].sum()), total + float(s2.sum())
        errors.append(float((s2[k:].sum() / s2.sum()).sqrt()))
        params += k * sum(d.shape)
    return kept / total, errors, params


def test_slider_moves_traits_and_figures(tiny_llama):
    model = trained_like(tiny_llama[0])
    deltas = dense(model, "default")
    ex = RankExplorer(model, rank=6)
    seen = []
    ex.observe(lambda ch: seen.append(ch["new"]), names="rank")
    z6 = np.array(ex.live.figure.data[0].z, dtype=float)
    title6 = ex.detail.figure.layout.title.text
    assert ex.rank == 6 and ex.energy_kept == pytest.approx(oracle(deltas, 6)[0], rel=1e-9)

    ex.slider.value = 2                                      # the user drags the slider
    energy, errors, params = oracle(deltas, 2)
    assert ex.rank == 2 and seen == [2]
    assert ex.energy_kept == pytest.approx(energy, rel=1e-9)
    assert ex.relative_error == pytest.approx(float(np.median(errors)), rel=1e-9)
    assert ex.parameters == params and "rank 2" in ex.summary.value
    z2 = np.array(ex.live.figure.data[0].z, dtype=float)
    assert not np.allclose(z2, z6)
    # heatmap cell (layer 1, v_proj) == that module's energy at k = 2
    s2 = torch.linalg.svdvals(deltas["model.layers.1.self_attn.v_proj"]) ** 2
    col = list(ex.live.figure.data[0].x).index("v_proj")
    assert z2[list(ex.live.figure.data[0].y).index("1"), col] == pytest.approx(
        float(s2[:2].sum() / s2.sum()), rel=1e-9)
    shape = ex.detail.figure.layout.shapes[0]
    assert (shape.x0, shape.x1) == (2.5, 2.5) and ex.detail.figure.layout.title.text != title6

    ex.rank = 3                                              # the trait drives the slider too
    assert ex.slider.value == 3 and ex.parameters == oracle(deltas, 3)[2]
    choice = ex.result
    assert choice.rank == 3 and len(choice.table) == len(deltas) and choice.compression is None
    assert choice.table["rel_error"].tolist() == pytest.approx(oracle(deltas, 3)[1], rel=1e-9)


def test_compress_button_gives_truncated_svd(tiny_llama):
    model = trained_like(tiny_llama[0])
    before = dense(model, "default")
    ex = RankExplorer(model, rank=3)
    ex.compress_button.click()
    assert ex.error == "" and ex.compression.adapter == "default_r3"
    assert model.peft_config["default_r3"].r == 3 and "default_r3" in ex.report.value
    after = dense(model, "default_r3")
    for name, d in before.items():
        U, S, Vh = torch.linalg.svd(d)
        torch.testing.assert_close(after[name], U[:, :3] @ torch.diag(S[:3]) @ Vh[:3],
                                   rtol=1e-4, atol=1e-6)
    assert ex.result.compression is ex.compression
    assert "compress_adapter(model, 3, adapter='default', new_name='default_r3')" in ex.code()

    ex.compress_button.click()                               # same name again: refused inline
    assert "already has an adapter named 'default_r3'" in ex.error and "⚠" in ex.message.value
    ex.slider.value = 8                                      # r itself: nothing to cut
    assert ex.error == ""
    ex.compress_button.click()
    assert "1..7" in ex.error
    assert set(model.peft_config) == {"default", "default_r3"}


def test_pickers_and_phi_view(tiny_llama):
    model = trained_like(tiny_llama[0], r=4, name="small", seed=1)
    model = trained_like(model, r=8, name="big", seed=2)
    ex = RankExplorer(model, adapter="small", other_adapter="big", rank=2)
    assert ex.adapter == "small" and ex.comparison is not None and ex.phi_live is not None
    ex.metric.value = "phi_at_k"
    name = "model.layers.0.mlp.down_proj"
    grid = ex.comparison.grids[name]
    z = np.array(ex.live.figure.data[0].z, dtype=float)
    cell = z[list(ex.live.figure.data[0].y).index("0"), list(ex.live.figure.data[0].x).index(
        "down_proj")]
    assert cell == pytest.approx(float(grid[1, 1]))
    ex.slider.value = 4
    z = np.array(ex.live.figure.data[0].z, dtype=float)
    col = list(ex.live.figure.data[0].x).index("down_proj")
    assert z[0, col] == pytest.approx(float(grid[3, 3]))

    ex.metric.value = "effective_rank"                      # a k-free metric from the table
    table = adapter_spectra(model, "small").table
    z = np.array(ex.live.figure.data[0].z, dtype=float)
    assert np.nanmax(z) == pytest.approx(table.groupby(["layer", "module_type"])
                                         ["effective_rank"].mean().max())
    ex.module.value = name                                   # module picker: its own spectrum
    bars = np.array(ex.detail.figure.data[0].y, dtype=float)
    ref = torch.linalg.svdvals(dense(model, "small")[name])[:4].numpy()
    np.testing.assert_allclose(bars, ref[ref > 0], rtol=1e-9)
    assert name in ex.detail.figure.layout.title.text
    np.testing.assert_allclose(np.array(ex.phi_live.figure.data[0].z, dtype=float), grid.numpy())


def test_spectra_only_and_bad_source(tiny_llama):
    model = trained_like(tiny_llama[0])
    ex = RankExplorer(adapter_spectra(model))
    assert ex.compress_button.disabled
    assert ex.compress() is None and "no adapter to compress" in ex.error
    namespace = {"model": model}
    exec(ex.code(), namespace)                               # the plain Python runs as written
    assert namespace["spectra"].table.equals(ex.spectra.table)
    with pytest.raises(AdapterError, match="neither a model"):
        RankExplorer([1, 2, 3])
    model = ll.attach(model, ll.AdapterSpec(r=4, target_modules=("q_proj",)), name="fresh")
    fresh = RankExplorer(model, adapter="fresh")             # B = 0: ΔW = 0, said so
    assert "untrained" in fresh.summary.value and fresh.energy_kept == 1.0


def test_dora_adapter_views_say_true_delta(tiny_llama):
    """A DoRA adapter is explored through its true ΔW = W' − W (full rank), and every view says so."""
    from lora_lab.hf.spectra.analysis import DORA_NOTE

    model = ll.attach(tiny_llama[0], ll.AdapterSpec(r=4, target_modules=("q_proj",), use_dora=True))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    ex = RankExplorer(model, rank=4)
    name = ex.module.value
    true = next(f for f in lora_factors(model, with_base=True) if f.name == name).true_delta()
    s2 = torch.linalg.svdvals(true) ** 2
    assert ex.energy_kept < 1.0 and len(ex.spectra[name]) == min(true.shape)   # rank 4 is not all
    assert ex.spectra[name].energy_at(4) == pytest.approx(float(s2[:4].sum() / s2.sum()))
    assert DORA_NOTE in ex.summary.value
    assert DORA_NOTE in ex.detail.figure.layout.title.text
    assert DORA_NOTE in ex.live.figure.layout.title.text
    ex.metric.value = "effective_rank"
    assert DORA_NOTE in ex.live.figure.layout.title.text
    assert ex.compress() is None and "full rank" in ex.error                  # refused, says why
