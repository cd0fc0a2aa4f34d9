"""bitsandbytes round trips, low-rank recovery on real schemes, and the streaming scan."""

from __future__ import annotations

import warnings

import pandas as pd
import pytest
import torch

from lora_lab.core.quant import block_absmax
from lora_lab.errors import LoraLabError
from lora_lab.hf.quant import roundtrip as hq
from lora_lab.hf.quant import scan as hs

N = 1024


@pytest.fixture(scope="module")
def gauss():
    return torch.randn(N, N, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- round trips -----------------
def test_nf4_and_fp4_mean_abs_error_match_bitsandbytes_figures(gauss):
    # bitsandbytes tests/test_functional.py: N(0,1) at blocksize 64 -> NF4 ≈ 0.073, FP4 ≈ 0.097
    assert hq.quant_error(gauss, "nf4").mean_abs_error == pytest.approx(0.073, abs=0.002)
    assert hq.quant_error(gauss, "fp4").mean_abs_error == pytest.approx(0.097, abs=0.002)


def test_nf4_beats_fp4_and_int8_beats_both_at_every_blocksize(gauss):
    prev = {}
    w = gauss[:256]  # 262k values are plenty to order the schemes
    llm_int8 = hq.quant_error(w, "int8").rel_error  # one absmax per row: no blocksize
    for bs in (64, 128, 256, 1024):
        e = {s: hq.quant_error(w, s, bs).rel_error for s in ("nf4", "fp4", "int8-blockwise", "int4")}
        assert e["int8-blockwise"] < e["nf4"] < e["fp4"], (bs, e)
        assert e["nf4"] < e["int4"], (bs, e)  # NF4's normal quantiles beat uniform int4 levels
        assert hq.quant_error(w, "int8", bs).rel_error == llm_int8 < e["nf4"]
        for s, err in e.items():  # larger blocks share one absmax among more values: worse
            assert err > prev.get(s, 0)
        prev = e


def test_double_quant_lowers_bits_as_qlora_computes(gauss):
    plain, dq = hq.quant_error(gauss, "nf4", 64), hq.quant_error(gauss, "nf4", 64, double_quant=True)
    assert plain.bits_per_param == pytest.approx(4.5)
    assert dq.bits_per_param == pytest.approx(4.127, abs=1e-3)
    assert dq.rel_error == pytest.approx(plain.rel_error, rel=0.01)
    i8 = hq.quant_error(gauss, "int8-blockwise", 64, double_quant=True)
    assert i8.bits_per_param < hq.quant_error(gauss, "int8-blockwise", 64).bits_per_param
    # LLM.int8() stores one fp32 absmax per row of 1024 and has no double quantization
    llm = hq.quant_error(gauss, "int8", 64, double_quant=True)
    assert (llm.bits_per_param, llm.blocksize, llm.double_quant) == (8 + 32 / 1024, 1024, False)


@pytest.mark.parametrize("scheme", ["nf4", "fp4"])
def test_reconstruction_lies_on_code_points_times_block_absmax(scheme):
    w = torch.randn(64, 128)
    q = hq.roundtrip(scheme, 64)(w)
    code = hq.code_points(scheme)
    assert len(code) == 16 and code.min() == -1 and code.max() <= 1
    ratio = q.reshape(-1, 64) / block_absmax(w, 64)[:, None]
    dist = (ratio[..., None] - code).abs().amin(-1)
    assert dist.max() < 1e-5


def test_quant_error_rejects_bad_input(gauss):
    with pytest.raises(LoraLabError, match="scheme"):
        hq.quant_error(gauss, "nf2")
    with pytest.raises(LoraLabError, match="blocksize"):
        hq.quant_error(gauss, "nf4", blocksize=48)
    with pytest.raises(LoraLabError, match="float"):
        hq.quant_error(torch.ones(4, 4, dtype=torch.uint8), "nf4")


# ---------------------------------------------------------------- recovery + peft -------------
def test_loftq_factors_initialise_a_peft_adapter(tiny_llama):
    from peft import LoraConfig, get_peft_model

    model, _ = tiny_llama
    W = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    res = hq.lowrank_recovery(W, "nf4", ranks=(4, 8), loftq_iters=3, scaling=2.0)
    assert res.loftq_rel_errors[1] <= res.svd_rel_errors[1] < res.quant_rel_error
    c = res.corrections[8]
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"], layers_to_transform=[0])
    peft_model = get_peft_model(model, cfg)
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.base_layer.weight.copy_(c.base)
        layer.lora_A["default"].weight.copy_(c.A)
        layer.lora_B["default"].weight.copy_(c.B)
    effective = layer.base_layer.weight + layer.get_delta_weight("default")
    assert ((effective - W).norm() / W.norm()).item() == pytest.approx(c.rel_error, rel=1e-4)


# ---------------------------------------------------------------- the scan --------------------
def test_scan_selects_linear_weights_with_layer_and_module(tiny_llama):
    model, _ = tiny_llama
    scan = hs.scan_quantization(model, schemes=("nf4", "int8"), progress=False)
    t = scan.table
    assert len(t) == 2 * 7 * 2 and not scan.interrupted and scan.n_done == scan.n_total == 14
    assert set(t.module) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert sorted(t.layer.unique()) == [0, 1]
    assert not t.name.str.contains("embed|norm|lm_head").any()
    row = t[(t.name == "model.layers.1.mlp.down_proj.weight") & (t.scheme == "nf4")].iloc[0]
    W = model.model.layers[1].mlp.down_proj.weight
    assert (row.out_features, row.in_features) == tuple(W.shape)
    assert row.rel_error == pytest.approx(hq.quant_error(W, "nf4").rel_error)
    s = scan.summary.set_index("scheme")
    assert s.loc["nf4", "params"] == t[t.scheme == "nf4"].numel.sum()
    assert s.loc["nf4", "size_mb"] < s.loc["int8", "size_mb"] < s.loc["nf4", "fp16_mb"]
    assert "14/14" in repr(scan) and "<table" in scan._repr_html_()


def test_streaming_file_folder_and_shards_equal_in_memory(tiny_llama, tiny_llama_dir, tmp_path):
    model, _ = tiny_llama
    schemes = ("nf4", "int8")
    ref = hs.scan_quantization(model, schemes, progress=False).table
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    for src in (tiny_llama_dir, tiny_llama_dir / "model.safetensors", str(tmp_path)):
        got = hs.scan_quantization(src, schemes, progress=False).table
        got = got.set_index(["name", "scheme"]).loc[ref.set_index(["name", "scheme"]).index]
        pd.testing.assert_frame_equal(got.reset_index()[ref.columns], ref, check_exact=True)


def test_interrupted_scan_keeps_finished_rows(tiny_llama_dir):
    full = hs.scan_quantization(tiny_llama_dir, schemes=("nf4",), progress=False)
    seen = []

    def stop_after_five(row):
        seen.append(row["name"])
        if len(seen) == 5:
            raise KeyboardInterrupt

    with pytest.warns(RuntimeWarning, match="interrupted after 4 of 14"):
        part = hs.scan_quantization(tiny_llama_dir, schemes=("nf4",), progress=True,
                                    callback=stop_after_five)
    assert part.interrupted and part.n_done == 4 and part.n_total == 14
    pd.testing.assert_frame_equal(part.table, full.table.iloc[:5])
    assert "INTERRUPTED" in repr(part)


def test_other_errors_in_a_scan_propagate(tiny_llama_dir):
    def boom(row):
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        hs.scan_quantization(tiny_llama_dir, progress=False, callback=boom)


def test_quantized_model_is_refused_with_a_fix(tiny_llama_nf4):
    model, _ = tiny_llama_nf4
    with pytest.raises(LoraLabError, match="full-precision") as info:
        hs.scan_quantization(model, progress=False)
    assert "scan_quantization(" in str(info.value)  # points at the checkpoint it came from


def test_truncated_safetensors_names_file_and_tensor(tiny_llama_dir, tmp_path):
    data = (tiny_llama_dir / "model.safetensors").read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[:-5000])
    with pytest.raises(LoraLabError, match="cut.safetensors") as info:
        hs.scan_quantization(bad, progress=False)
    assert "truncated" in str(info.value) and "tensor 'model." in str(info.value)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"0" * 100)
    with pytest.raises(LoraLabError, match="junk.safetensors"):
        hs.scan_quantization(junk, progress=False)


@pytest.mark.parametrize("make, match", [
    (lambda p: p / "nothing", "does not exist"),
    (lambda p: p, "no .safetensors"),
    (lambda p: (p / "w.bin").write_bytes(b"x") and p / "w.bin", "not a .safetensors"),
    (lambda p: 42, "source of type int"),
])
def test_bad_sources_raise_clear_errors(tmp_path, make, match):
    with pytest.raises(LoraLabError, match=match):
        hs.scan_quantization(make(tmp_path), progress=False)


def test_scan_of_a_state_dict_with_double_quant():
    sd = {"model.layers.0.mlp.up_proj.weight": torch.randn(128, 64),
          "model.layers.0.input_layernorm.weight": torch.ones(64),
          "model.embed_tokens.weight": torch.randn(100, 64)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scan = hs.scan_quantization(sd, schemes=("nf4", "int4"), double_quant=True, progress=False)
    assert list(scan.table.name.unique()) == ["model.layers.0.mlp.up_proj.weight"]
    assert (scan.table.bits_per_param < 4.2).all() and scan.table.double_quant.all()


@pytest.mark.parametrize("scheme, dq", [("nf4", False), ("fp4", True), ("nf4", True)])
def test_chunked_4bit_round_trip_equals_one_bitsandbytes_call(scheme, dq):
    import bitsandbytes.functional as F

    w = torch.randn(300, 1000, dtype=torch.float16)  # 300k values: 5 chunks of 64k + a partial one
    q, st = F.quantize_4bit(w, blocksize=64, quant_type=scheme, compress_statistics=dq)
    whole = F.dequantize_4bit(q, st)
    chunked = hq.roundtrip(scheme, 64, dq, chunk=64 * 256 * 4)(w)
    assert chunked.dtype == w.dtype and torch.equal(chunked, whole)


@pytest.mark.gpu
def test_gpu_round_trip_matches_cpu_statistics():
    w = torch.randn(512, 512, generator=torch.Generator().manual_seed(5))
    cpu, gpu = hq.quant_error(w, "nf4"), hq.quant_error(w.cuda(), "nf4")
    assert gpu.rel_error == pytest.approx(cpu.rel_error, rel=1e-3)
    res = hq.lowrank_recovery(w.cuda(), "nf4", ranks=(8,), loftq_iters=2)
    assert res.corrections[8].A.is_cuda and res.loftq_rel_errors[0] <= res.svd_rel_errors[0]
