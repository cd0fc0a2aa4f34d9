"""Low-rank corrections of the quantization error (core/lowrank.py): Eckart–Young and LoftQ."""

from __future__ import annotations

import math

import pytest
import torch

from lora_lab.core import lowrank as cl
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





# ---------------------------------------------------------------- low-rank recovery -----------
def test_recovery_is_eckart_young_from_one_svd_and_falls_with_rank():
    w = structured()
    res = cl.recover_lowrank(w, int4, ranks=(32, 4, 8, 16), scheme="int4")
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
    real = cl.truncated_svd
    monkeypatch.setattr(cl, "truncated_svd", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    cl.recover_lowrank(structured(), int4, ranks=(4, 8, 16))
    assert calls == [16]


def test_scaling_is_respected_by_the_factors():
    w = structured()
    r1 = cl.recover_lowrank(w, int4, ranks=(8,), scaling=1.0).corrections[8]
    r4 = cl.recover_lowrank(w, int4, ranks=(8,), scaling=4.0).corrections[8]
    assert torch.allclose(r1.delta(), r4.delta(), atol=1e-5)
    assert torch.allclose(r4.B @ r4.A * 4, r1.B @ r1.A, atol=1e-5)
    # what ignoring s does (peft's LoftQ): the correction is applied 4×, worse than none at all
    E = w - int4(w)
    assert (E - 4 * (r1.B @ r1.A)).norm() > E.norm()


def test_loftq_never_worse_than_svd_and_helps_on_structured_weights():
    w = structured()
    res = cl.recover_lowrank(w, int4, ranks=(4, 16), loftq_iters=4, scaling=2.0)
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
    a = cl.recover_lowrank(w, int4, ranks=(8,), loftq_iters=3, scaling=1.0)
    b = cl.recover_lowrank(w, int4, ranks=(8,), loftq_iters=3, scaling=8.0)
    assert a.loftq_rel_errors[0] == pytest.approx(b.loftq_rel_errors[0], rel=1e-3)
    assert torch.allclose(a.corrections[8].delta(), b.corrections[8].delta(), atol=1e-3)


def test_randomized_svd_is_close_to_exact():
    w = structured(out=256, inp=384)
    ex = cl.recover_lowrank(w, int4, ranks=(8, 16), svd_method="exact")
    rnd = cl.recover_lowrank(w, int4, ranks=(8, 16), svd_method="randomized")
    for e, r in zip(ex.svd_rel_errors, rnd.svd_rel_errors):
        assert e <= r + 1e-6 and r == pytest.approx(e, rel=2e-3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(ranks=(0, 4)), "ranks"), (dict(ranks=(500,)), "ranks"), (dict(scaling=0), "scaling"),
    (dict(loftq_iters=-1), "loftq_iters"), (dict(svd_method="qr"), "svd"),
])
def test_recovery_rejects_bad_arguments(kwargs, match):
    with pytest.raises(LoraLabError, match=match):
        cl.recover_lowrank(structured(), int4, **kwargs)
    with pytest.raises(LoraLabError, match="2-D"):
        cl.recover_lowrank(torch.randn(64), int4)
