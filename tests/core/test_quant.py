"""Core quantization math, tested with oracles and the pure-torch absmax int4 round trip."""

from __future__ import annotations

import math

import pytest
import torch

from lora_lab.core import quant as cq
from lora_lab.errors import LoraLabError


def int4(w):
    return cq.absmax_roundtrip(w, 4, 64)


def structured(out=192, inp=256, rank=12, seed=0):
    """Low-rank signal plus noise and a few outliers: like a trained weight, unlike pure noise."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, rank, generator=g) @ torch.randn(rank, inp, generator=g) / 8
    w += 0.05 * torch.randn(out, inp, generator=g)
    w.view(-1)[torch.randint(0, out * inp, (20,), generator=g)] *= 12
    return w


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


# ---------------------------------------------------------------- low-rank recovery -----------
def test_recovery_is_eckart_young_from_one_svd_and_falls_with_rank():
    w = structured()
    res = cq.recover_lowrank(w, int4, ranks=(32, 4, 8, 16), scheme="int4")
    assert res.ranks == (4, 8, 16, 32)
    E = (w - int4(w)).double()
    s2 = torch.linalg.svdvals(E) ** 2
    oracle = [(math.sqrt(E.square().sum() - s2[:r].sum()) / w.double().norm()).item()
              for r in res.ranks]
    assert res.svd_rel_errors == pytest.approx(oracle, rel=1e-4)
    errs = (res.quant_rel_error, *res.svd_rel_errors)
    assert all(a > b for a, b in zip(errs, errs[1:]))
    for r, c in res.corrections.items():  # the factors really achieve the reported error
        assert c.A.shape == (r, 256) and c.B.shape == (192, r) and c.base is None
        direct = (E.float() - c.delta()).norm() / w.norm()
        assert direct.item() == pytest.approx(c.rel_error, rel=1e-4)
    assert list(res.to_frame()["rank"]) == [0, 4, 8, 16, 32]
    assert 0 < res.recovered_share(32) < 1


def test_single_svd_serves_all_ranks(monkeypatch):
    calls = []
    real = cq.truncated_svd
    monkeypatch.setattr(cq, "truncated_svd", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    cq.recover_lowrank(structured(), int4, ranks=(4, 8, 16))
    assert calls == [16]


def test_scaling_is_respected_by_the_factors():
    w = structured()
    r1 = cq.recover_lowrank(w, int4, ranks=(8,), scaling=1.0).corrections[8]
    r4 = cq.recover_lowrank(w, int4, ranks=(8,), scaling=4.0).corrections[8]
    assert torch.allclose(r1.delta(), r4.delta(), atol=1e-5)
    assert torch.allclose(r4.B @ r4.A * 4, r1.B @ r1.A, atol=1e-5)
    # what ignoring s does (peft's LoftQ): the correction is applied 4×, worse than none at all
    E = w - int4(w)
    assert (E - 4 * (r1.B @ r1.A)).norm() > E.norm()


def test_loftq_never_worse_than_svd_and_helps_on_structured_weights():
    w = structured()
    res = cq.recover_lowrank(w, int4, ranks=(4, 16), loftq_iters=4, scaling=2.0)
    for r, svd_err, lq_err in zip(res.ranks, res.svd_rel_errors, res.loftq_rel_errors):
        hist = res.loftq_history[r]
        assert len(hist) == 4 and hist[0] == pytest.approx(svd_err, rel=1e-4)
        assert lq_err == pytest.approx(min(hist)) and lq_err <= svd_err
        c = res.corrections[r]
        # the base is a point of the quantization grid, and base + s·B·A has the reported error
        assert torch.allclose(int4(c.base), c.base, atol=1e-5)
        assert ((w - c.base - c.delta()).norm() / w.norm()).item() == pytest.approx(lq_err, rel=1e-4)
    assert res.loftq_rel_errors[-1] < 0.99 * res.svd_rel_errors[-1]
    assert "LoftQ" in repr(res) and "loftq_rel_error" in res.to_frame()


def test_loftq_result_does_not_depend_on_scaling():
    w = structured(seed=1)
    a = cq.recover_lowrank(w, int4, ranks=(8,), loftq_iters=3, scaling=1.0)
    b = cq.recover_lowrank(w, int4, ranks=(8,), loftq_iters=3, scaling=8.0)
    assert a.loftq_rel_errors[0] == pytest.approx(b.loftq_rel_errors[0], rel=1e-3)
    assert torch.allclose(a.corrections[8].delta(), b.corrections[8].delta(), atol=1e-3)


def test_randomized_svd_is_close_to_exact():
    w = structured(out=256, inp=384)
    ex = cq.recover_lowrank(w, int4, ranks=(8, 16), svd_method="exact")
    rnd = cq.recover_lowrank(w, int4, ranks=(8, 16), svd_method="randomized")
    for e, r in zip(ex.svd_rel_errors, rnd.svd_rel_errors):
        assert e <= r + 1e-6 and r == pytest.approx(e, rel=2e-3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(ranks=(0, 4)), "ranks"), (dict(ranks=(500,)), "ranks"), (dict(scaling=0), "scaling"),
    (dict(loftq_iters=-1), "loftq_iters"), (dict(svd_method="qr"), "svd"),
])
def test_recovery_rejects_bad_arguments(kwargs, match):
    with pytest.raises(LoraLabError, match=match):
        cq.recover_lowrank(structured(), int4, **kwargs)
    with pytest.raises(LoraLabError, match="2-D"):
        cq.recover_lowrank(torch.randn(64), int4)
