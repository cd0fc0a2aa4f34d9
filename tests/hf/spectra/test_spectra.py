"""Model-level spectra, comparison and compression, checked against dense ΔW and merged weights."""

from __future__ import annotations

import math

import pytest
import torch

from lora_lab.core.spectrum import lowrank_svdvals
from lora_lab.errors import AdapterError
from lora_lab.hf.adapters.factors import lora_factors
from lora_lab.hf.spectra.analysis import adapter_spectra, compare_adapters
from lora_lab.hf.spectra.compress import compress_adapter

TARGETS = ["q_proj", "v_proj", "down_proj"]


def lora(model, name="default", r=8, alpha=16, **kw):
    """Attach a LoRA adapter with peft directly and give B random values (as if trained)."""
    import peft

    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, **kw)
    if isinstance(model, peft.PeftModel):
        model.add_adapter(name, cfg)
    else:
        model = peft.get_peft_model(model, cfg, adapter_name=name)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "lora_B") and name in m.lora_B:
                m.lora_B[name].weight.normal_(0, 0.05)
    return model


def dense_deltas(model, adapter):
    return {f.name: f.scaling * (f.B.double() @ f.A.double()) for f in lora_factors(model, adapter)}


def test_adapter_spectra_table_matches_dense(tiny_llama):
    model = lora(tiny_llama[0])
    result = adapter_spectra(model)
    deltas = dense_deltas(model, "default")
    assert result.adapter == "default" and len(result) == len(deltas) == 2 * 3
    t = result.table
    assert list(t["module_type"].unique()) == TARGETS and sorted(t["layer"].unique()) == [0, 1]
    for _, row in t.iterrows():
        ref = torch.linalg.svdvals(deltas[row["name"]])
        torch.testing.assert_close(result[row["name"]].values, ref[:8], rtol=1e-9, atol=1e-12)
        assert (row["out"], row["in"], row["r"]) == (*deltas[row["name"]].shape, 8)
        assert row["scaling"] == 2.0 and row["top_sigma"] == pytest.approx(float(ref[0]))
        energy = torch.cumsum(ref ** 2, 0) / (ref ** 2).sum()
        assert row["k90"] == int((energy < 0.9 - 1e-12).sum()) + 1
    assert "AdapterSpectra('default'" in repr(result) and "<table" in result._repr_html_()
    assert result.parameters_at(4) == sum(4 * sum(d.shape) for d in deltas.values())


def test_untrained_adapter_has_zero_spectrum(tiny_llama):
    import peft

    model = peft.get_peft_model(tiny_llama[0], peft.LoraConfig(r=4, target_modules=["q_proj"]))
    t = adapter_spectra(model).table                  # B = 0 at init: ΔW = 0
    assert (t["top_sigma"] == 0).all() and (t["effective_rank"] == 0).all() and (t["k90"] == 0).all()


def test_fan_in_fan_out_conv1d_matches_merged_weight():
    import peft
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32)
    base = GPT2LMHeadModel(cfg)
    model = peft.get_peft_model(base, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True,
        init_lora_weights=False))                     # random B, so ΔW ≠ 0
    factors = list(lora_factors(model))
    assert len(factors) == 2 and all(f.shape == (96, 32) for f in factors)
    before = {f.name: model.get_submodule("base_model.model." + f.name).base_layer.weight.clone()
              for f in factors}
    model.merge_adapter()
    for f in factors:
        merged = model.get_submodule("base_model.model." + f.name).base_layer.weight
        diff = (merged - before[f.name]).double()     # Conv1D stores (in, out): the diff is ΔWᵀ
        assert diff.shape == (32, 96)
        torch.testing.assert_close(diff.T, f.scaling * (f.B.double() @ f.A.double()),
                                   rtol=1e-4, atol=1e-6)
        ref = torch.linalg.svdvals(diff)[:4]
        torch.testing.assert_close(lowrank_svdvals(f.B, f.A, f.scaling), ref, rtol=1e-4, atol=1e-6)
    model.unmerge_adapter()
    table = adapter_spectra(model).table
    assert list(table["module_type"]) == ["c_attn", "c_attn"] and list(table["out"]) == [96, 96]


def test_compare_adapters_same_subspace_vs_random(tiny_llama):
    model = lora(tiny_llama[0], "first", r=4)
    model = lora(model, "random", r=4)
    model.add_adapter("mixed", model.peft_config["first"])
    with torch.no_grad():                             # same ΔW, different factors: B M, M⁻¹ A
        for m in model.modules():
            if hasattr(m, "lora_A") and "first" in m.lora_A:
                M = torch.randn(4, 4) + 4 * torch.eye(4)
                m.lora_B["mixed"].weight.copy_(m.lora_B["first"].weight @ M)
                m.lora_A["mixed"].weight.copy_(torch.linalg.solve(M, m.lora_A["first"].weight))
    same = compare_adapters(model, model, "first", "mixed", basis="delta")
    assert len(same.table) == 6 and not same.only_in_a and same.basis == "delta"
    assert same.table["phi_k"].to_numpy() == pytest.approx(1.0, abs=1e-6)
    assert same.table["phi_top"].to_numpy() == pytest.approx(1.0, abs=1e-4)
    assert same.grids[same.table["name"][0]].shape == (4, 4)
    # the paper's φ orders A's directions by A's singular values: M⁻¹A reorders them, so only the
    # full-rank φ(4, 4) (the same span) is still 1
    paper = compare_adapters(model, model, "first", "mixed")
    assert paper.basis == "factor" and "basis='factor'" in repr(paper)
    assert paper.table["phi_k"].to_numpy() == pytest.approx(1.0, abs=1e-6)
    assert (paper.table["phi_top"] < 0.99).any()
    rand = compare_adapters(model, model, "first", "random")
    assert (rand.table["phi_k"] < 0.5).all()
    # random subspaces of dimension 4 in d = 64 (q/v input) or 128 (down_proj input): φ ≈ 4/d
    ratio = rand.table["phi_k"] / rand.table["random_baseline"]
    assert 0.2 < ratio.median() < 5
    left = compare_adapters(model, model, "first", "mixed", side="left")
    assert left.table["phi_k"].to_numpy() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(AdapterError, match="side"):
        compare_adapters(model, model, "first", "b", side="up")
    with pytest.raises(AdapterError, match="basis"):
        compare_adapters(model, model, "first", "mixed", basis="W")


def _phi_of(V1, V2):
    return torch.tensor([[float(torch.linalg.matrix_norm(V1[:, :i].T @ V2[:, :j]) ** 2 / min(i, j))
                          for j in range(1, V2.shape[1] + 1)] for i in range(1, V1.shape[1] + 1)],
                        dtype=torch.float64)


def test_compare_adapters_is_the_papers_phi_of_A(tiny_llama):
    """LoRA §7.2 computed here from torch.linalg.svd of each adapter's A: the default is that φ; the
    ΔW-ordered φ (basis="delta") differs below full rank and agrees at φ(r_a, r_b)."""
    model = lora(tiny_llama[0], "low", r=2)
    model = lora(model, "high", r=6)
    with torch.no_grad():                                  # "trained" A: random, not peft's init
        for m in model.modules():
            if hasattr(m, "lora_A") and "low" in m.lora_A:
                m.lora_A["high"].weight[:2] += 2 * m.lora_A["low"].weight   # some shared directions
    paper = compare_adapters(model, model, "low", "high")
    delta = compare_adapters(model, model, "low", "high", basis="delta")
    fa, fb = ({f.name: f for f in lora_factors(model, a)} for a in ("low", "high"))
    differ = 0.0
    for name, grid in paper.grids.items():
        V1 = torch.linalg.svd(fa[name].A.double(), full_matrices=False).Vh.T
        V2 = torch.linalg.svd(fb[name].A.double(), full_matrices=False).Vh.T
        torch.testing.assert_close(grid, _phi_of(V1, V2))
        assert grid.shape == delta.grids[name].shape == (2, 6)
        assert float(grid[1, 5]) == pytest.approx(float(delta.grids[name][1, 5]), abs=1e-9)
        differ = max(differ, float((grid - delta.grids[name]).abs().max()))
    assert differ > 0.05


def dora_model(model, r=4):
    """A DoRA adapter with random B and a magnitude moved off its init ‖W‖_c (as if trained)."""
    model = lora(model, "dora", r=r, use_dora=True)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "lora_magnitude_vector") and "dora" in m.lora_magnitude_vector:
                w = m.lora_magnitude_vector["dora"].weight
                w.mul_(1 + 0.05 * torch.randn(w.shape, generator=gen))
    return model


def test_dora_spectra_are_of_the_true_delta(tiny_llama):
    """Oracle: peft's own merge (merge_and_unload on a copy) minus the base weight."""
    import copy

    from lora_lab.hf.adapters.merged_weights import merged_weight
    from lora_lab.hf.spectra.analysis import DORA_NOTE

    model = dora_model(tiny_llama[0])
    result = adapter_spectra(model, "dora")
    merged = copy.deepcopy(model).merge_and_unload()
    layers = dict(model.base_model.model.named_modules())
    assert result.notes == [DORA_NOTE] and result.table["dora"].all() and "DoRA" in repr(result)
    for f in lora_factors(model, "dora", with_base=True):
        true = merged.get_submodule(f.name).weight.double() - f.weight.double()
        torch.testing.assert_close(f.true_delta(), true, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(merged_weight(layers[f.name], "dora").double() - f.weight.double(),
                                   true, rtol=1e-4, atol=1e-6)
        sp = result[f.name]
        assert sp.note == DORA_NOTE and len(sp) == min(f.shape) and sp.numerical_rank == min(f.shape)
        torch.testing.assert_close(sp.values, torch.linalg.svdvals(true), rtol=1e-4, atol=1e-6)
        assert float((true - f.delta().double()).norm() / true.norm()) > 0.05   # ≠ s·B·A
        assert sp.effective_rank > f.r
    # every figure drawn from it says what it shows
    from lora_lab.viz.spectrum import spectrum_evolution_figure, spectrum_figure, spectrum_heatmap

    name = result.table["name"][0]
    assert DORA_NOTE in spectrum_figure(result[name], k=2, title="custom").layout.title.text
    assert DORA_NOTE in spectrum_heatmap(result, "energy_at_k", k=2).layout.title.text
    assert DORA_NOTE in spectrum_evolution_figure([(0, result[name])]).layout.title.text


def test_saved_dora_spectra_say_what_they_leave_out(tiny_llama, tmp_path):
    from lora_lab.hf.adapters.factors import saved_lora_factors
    from lora_lab.hf.spectra.analysis import DORA_FACTORS_NOTE

    model = dora_model(tiny_llama[0])
    model.save_pretrained(tmp_path, selected_adapters=["dora"])
    factors = saved_lora_factors(tmp_path / "dora")
    live = {f.name: f for f in lora_factors(model, "dora")}
    assert all(f.use_dora and torch.equal(f.magnitude, live[f.name].magnitude) for f in factors)
    with pytest.raises(AdapterError, match="base weight"):
        factors[0].true_delta()
    result = adapter_spectra(tmp_path / "dora")
    assert result.notes == [DORA_FACTORS_NOTE] and DORA_FACTORS_NOTE in repr(result)
    assert len(result[factors[0].name]) == 4                       # s·B·A: rank ≤ r
    cheap = adapter_spectra(model, "dora", dora="factors")         # asked for: same view, same note
    assert cheap.notes == [DORA_FACTORS_NOTE]
    for name, sp in cheap.spectra.items():
        torch.testing.assert_close(sp.values, result[name].values)
        torch.testing.assert_close(sp.values, torch.linalg.svdvals(live[name].delta().double())[:4],
                                   rtol=1e-5, atol=1e-7)
    with pytest.raises(AdapterError, match="dora"):
        adapter_spectra(model, "dora", dora="magnitude")


def test_dora_phi_uses_the_factors_and_delta_basis_refuses(tiny_llama):
    model = dora_model(lora(tiny_llama[0], "plain", r=4))
    cmp = compare_adapters(model, model, "plain", "dora")
    assert cmp.table["dora"].all() and "DoRA" in repr(cmp)
    with pytest.raises(AdapterError, match="full rank") as err:
        compare_adapters(model, model, "plain", "dora", basis="delta")
    assert "basis='factor'" in str(err.value)


def test_compressed_delta_equals_truncated_svd(tiny_llama):
    model = lora(tiny_llama[0], r=8, alpha=16)
    old = dense_deltas(model, "default")
    result = compress_adapter(model, 3)
    assert result.adapter == "default_r3" and model.active_adapter == "default"
    assert model.peft_config["default_r3"].r == 3
    new = dense_deltas(model, "default_r3")
    assert set(new) == set(old)
    for row in result.table.itertuples():
        U, S, Vh = torch.linalg.svd(old[row.name])
        best = U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]
        torch.testing.assert_close(new[row.name], best, rtol=1e-4, atol=1e-6)
        measured = float((old[row.name] - new[row.name]).norm() / old[row.name].norm())
        assert row.rel_error == pytest.approx(measured, rel=1e-3)
        assert row.energy_kept == pytest.approx(float((S[:3] ** 2).sum() / (S ** 2).sum()))
    assert result.parameters_after * 8 == result.parameters_before * 3
    assert "default_r3" in repr(result)


def test_compress_save_load_round_trip(tiny_llama, tiny_llama_dir, tmp_path):
    import peft

    import lora_lab as ll

    model = lora(tiny_llama[0], r=8, use_rslora=True)
    compress_adapter(model, 2, new_name="small")
    model.set_adapter("small")
    model.eval()
    ids = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    assert (expected - base).abs().max() > 1e-4       # the small adapter does something
    model.save_pretrained(tmp_path, selected_adapters=["small"])
    folder = tmp_path / "small"
    assert (folder / "adapter_model.safetensors").exists()
    fresh, _ = ll.load_model(tiny_llama_dir, device="cpu")
    loaded = peft.PeftModel.from_pretrained(fresh, folder)
    assert loaded.peft_config["default"].r == 2
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_compress_refuses_dora_and_bad_ranks(tiny_llama):
    model = lora(tiny_llama[0], r=4)
    for bad in (4, 9, 0, 2.5):
        with pytest.raises(AdapterError, match="rank") as err:
            compress_adapter(model, bad)
        assert "Fix:" in str(err.value)
    compress_adapter(model, 2)
    with pytest.raises(AdapterError, match="already has"):
        compress_adapter(model, 2)
    with pytest.raises(AdapterError, match="no adapter named"):
        compress_adapter(model, 2, adapter="nope")
    dora = lora(model, "dora", r=4, use_dora=True)
    with pytest.raises(AdapterError, match="DoRA") as err:
        compress_adapter(dora, 2, adapter="dora")
    assert "merged_copy" in str(err.value) and "full rank" in str(err.value)   # says why
    assert "dora_r2" not in dora.peft_config                                 # nothing added
    assert math.isfinite(adapter_spectra(dora, "dora").table["top_sigma"].sum())


def test_compress_carries_lora_bias_and_modules_to_save(tiny_llama):
    model = lora(tiny_llama[0], r=4, lora_bias=True, modules_to_save=["lm_head"])
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "lora_B") and "default" in m.lora_B:
                m.lora_B["default"].bias.normal_()
            saved = getattr(m, "modules_to_save", None)
            if isinstance(saved, torch.nn.ModuleDict):
                saved["default"].weight.add_(1.0)         # "trained" away from the base lm_head
    compress_adapter(model, 2, new_name="small")
    heads = biases = 0
    for m in model.modules():
        if hasattr(m, "lora_B") and "small" in m.lora_B:
            assert torch.equal(m.lora_B["small"].bias, m.lora_B["default"].bias)
            biases += 1
        saved = getattr(m, "modules_to_save", None)
        if isinstance(saved, torch.nn.ModuleDict):
            assert torch.equal(saved["small"].weight, saved["default"].weight)
            heads += 1
    assert biases == 6 and heads == 1


def test_dora_on_conv1d_true_delta_matches_peft_merge():
    import copy

    import peft
    from transformers import GPT2Config, GPT2LMHeadModel

    base = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32))
    model = peft.get_peft_model(base, peft.LoraConfig(
        r=4, target_modules=["c_attn"], fan_in_fan_out=True, use_dora=True, init_lora_weights=False))
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "lora_magnitude_vector") and "default" in m.lora_magnitude_vector:
                m.lora_magnitude_vector["default"].weight.mul_(1.1)
    merged = copy.deepcopy(model).merge_and_unload()
    (f,) = lora_factors(model, with_base=True)
    true = merged.get_submodule(f.name).weight.double().T - f.weight.double()   # Conv1D: (in, out)
    assert f.weight.shape == f.shape == (96, 32)
    torch.testing.assert_close(f.true_delta(), true, rtol=1e-4, atol=1e-6)
    assert adapter_spectra(model)[f.name].numerical_rank == 32
