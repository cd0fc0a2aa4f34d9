"""Core quantization math, tested with oracles and the pure-torch absmax int4 round trip."""

from __future__ import annotations

import math

import pytest
import torch

from lora_lab.core import quant as cq
from lora_lab.errors import LoraLabError


def int4(w):
    return cq.absmax_roundtrip(w, 4, 64)


# ---------------------------------------------------------------- bits per parameter ----------
def test_bits_per_param_matches_qlora_paper():
    assert cq.bits_per_param("nf4", 64) == pytest.approx(4.5)
    # QLoRA §3: 8/64 + 32/(64·256) = 0.127 bit for the constants with double quantization
    assert cq.bits_per_param("nf4", 64, double_quant=True) == pytest.approx(4 + 0.125 + 32 / 16384)
    assert cq.bits_per_param("nf4", 64, True) == pytest.approx(4.127, abs=5e-4)
    assert cq.bits_per_param("int8", 64) == pytest.approx(8.5)
    assert cq.bits_per_param("fp4", 128) == pytest.approx(4.25)


def test_bits_per_param_exact_count_with_partial_blocks():
    n = 1000  # 16 blocks of 64, the last partial
    assert cq.bits_per_param("int4", 64, numel=n) == pytest.approx((4 * n + 16 * 32) / n)
    # dq: 16 one-byte constants, one fp32 scale for them (one block of 256), one fp32 offset
    assert cq.bits_per_param("nf4", 64, True, numel=n) == pytest.approx((4 * n + 16 * 8 + 32 + 32) / n)
    with pytest.raises(LoraLabError, match="scheme"):
        cq.bits_per_param("nf3")


# ---------------------------------------------------------------- absmax baseline -------------
def test_absmax_int4_is_within_half_a_step_and_keeps_each_block_max():
    w = torch.randn(100, 70)  # 7000 values: last block partial
    q = int4(w)
    assert q.shape == w.shape and q.dtype == w.dtype
    step = cq.block_absmax(w, 64) / 7
    err = (q - w).reshape(-1)
    pad = (-err.numel()) % 64
    err = torch.cat([err, err.new_zeros(pad)]).view(-1, 64)
    assert torch.all(err.abs() <= step[:, None] / 2 + 1e-6)
    assert torch.allclose(cq.block_absmax(q, 64), cq.block_absmax(w, 64))
    codes = torch.round(torch.cat([q.reshape(-1), q.new_zeros(pad)]).view(-1, 64) / step[:, None])
    assert codes.abs().max() <= 7 and len(torch.unique(codes)) <= 15


def test_absmax_double_quant_changes_constants_only_slightly():
    w = torch.randn(256, 256, dtype=torch.float16)
    q, qdq = int4(w), cq.absmax_roundtrip(w, 4, 64, double_quant=True)
    assert qdq.dtype == torch.float16
    a, b = cq.block_absmax(q, 64), cq.block_absmax(qdq, 64)
    assert not torch.equal(a, b)
    # 8-bit absmax of (c − mean c) in blocks of 256: error ≤ half a step of max|c − mean| / 127
    assert (a - b).abs().max() <= (a - a.mean()).abs().max() / 127 / 2 + 1e-3


# ---------------------------------------------------------------- error metrics ---------------
def test_error_metrics_match_direct_float64_formulas():
    torch.manual_seed(3)
    w = torch.randn(1100, 1000)  # > one 1M-element reduction chunk
    w[5, 7], w[900, 3] = 9.0, -8.0  # outliers beyond 6σ
    q = int4(w)
    q_before = q.clone()
    m = cq.error_metrics(w, q, scheme="int4", blocksize=64)
    assert torch.equal(q, q_before)  # inputs are never written to
    W, E = w.double(), (w - q).double()
    # fp32 reductions per chunk, fp64 across chunks: relative accuracy ~1e-6
    assert m.rel_error == pytest.approx((E.norm() / W.norm()).item(), rel=1e-5)
    assert m.mean_abs_error == pytest.approx(E.abs().mean().item(), rel=1e-5)
    assert m.max_abs_error == pytest.approx(E.abs().max().item(), rel=1e-6)
    assert m.snr_db == pytest.approx(10 * math.log10((W.square().sum() / E.square().sum()).item()),
                                     rel=1e-5)
    sigma = W.std(unbiased=False)
    assert m.outlier_share == pytest.approx(((W.abs() > 6 * sigma).sum() / W.numel()).item())
    assert m.outlier_share > 0 and m.shape == (1100, 1000)
    assert m.bits_per_param == pytest.approx(4.5, abs=1e-4)
    assert "int4" in repr(m) and "<table>" in m._repr_html_()


def test_error_metrics_of_a_perfect_reconstruction_and_shape_mismatch():
    w = torch.randn(8, 8)
    m = cq.error_metrics(w, w.clone(), scheme="nf4", blocksize=64)
    assert m.rel_error == 0 and m.max_abs_error == 0 and m.snr_db == math.inf
    with pytest.raises(LoraLabError, match="shape"):
        cq.error_metrics(w, w[:4], scheme="nf4", blocksize=64)
