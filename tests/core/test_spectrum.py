"""Oracles for the factored spectrum math: everything is checked against a dense SVD."""

from __future__ import annotations

import math

import pytest
import torch

from lora_lab.core.randomized import randomized_svd, randomized_svdvals
from lora_lab.core.spectrum import (Spectrum, amplification_factor, effective_rank, energy_at,
                                    lowrank_svd, lowrank_svdvals, rank_for_energy, stable_rank,
                                    subspace_similarity, subspace_similarity_grid)


def dense_svdvals(B, A, scale=1.0):
    return torch.linalg.svdvals(scale * (B.double() @ A.double()))


@pytest.mark.parametrize("m,n,r,scale", [(64, 48, 8, 1.0), (40, 90, 16, 0.25), (30, 20, 4, -2.0),
                                         (12, 10, 16, 1.0)])  # last: r > min(m, n)
def test_lowrank_svdvals_equals_svdvals_of_product(m, n, r, scale):
    B, A = torch.randn(m, r), torch.randn(r, n)
    got = lowrank_svdvals(B, A, scale)
    ref = dense_svdvals(B, A, scale)
    k = min(m, n, r)
    assert got.shape == (k,)
    torch.testing.assert_close(got, ref[:k], rtol=1e-10, atol=1e-10 * float(ref[0]))
    assert torch.all(ref[k:] <= 1e-10 * ref[0])          # the product has no more directions


def test_rank_deficient_factors():
    # B has rank 3 (r = 8): B·A has rank 3, and the extra values must come out as zeros.
    B = torch.randn(50, 3, dtype=torch.float64) @ torch.randn(3, 8, dtype=torch.float64)
    A = torch.randn(8, 40, dtype=torch.float64)
    got = lowrank_svdvals(B, A)
    ref = dense_svdvals(B, A)
    torch.testing.assert_close(got, ref[:8], rtol=0, atol=1e-10 * float(ref[0]))
    assert torch.all(got[3:] < 1e-10 * got[0]) and got[2] > 1e-3 * got[0]
    assert Spectrum.from_factors(B, A).numerical_rank == 3
    # A with a zero row, and an all-zero B (a freshly initialised LoRA adapter)
    A0 = A.clone(); A0[5] = 0
    torch.testing.assert_close(lowrank_svdvals(torch.randn(50, 8), A0)[7], torch.tensor(0.0,
                               dtype=torch.float64), atol=1e-9, rtol=0)
    zero = Spectrum.from_factors(torch.zeros(50, 8), A)
    assert zero.top == 0 and zero.effective_rank == 0 and zero.stable_rank == 0
    assert zero.rank_for_energy(0.9) == 0 and zero.energy_at(3) == 1.0 and zero.error_at(0) == 0


def test_lowrank_svd_reconstructs_product_with_orthonormal_factors():
    B, A = torch.randn(70, 6), torch.randn(6, 33)
    U, S, Vh = lowrank_svd(B, A, 0.5)
    torch.testing.assert_close(U @ torch.diag(S) @ Vh, 0.5 * B.double() @ A.double())
    torch.testing.assert_close(U.T @ U, torch.eye(6, dtype=torch.float64))
    torch.testing.assert_close(Vh @ Vh.T, torch.eye(6, dtype=torch.float64))
    assert torch.all(S[:-1] >= S[1:])


def test_float32_path_agrees():
    B, A = torch.randn(300, 16), torch.randn(16, 200)
    s64, s32 = lowrank_svdvals(B, A), lowrank_svdvals(B, A, dtype=torch.float32)
    assert s32.dtype == torch.float32
    assert float(((s32.double() - s64) / s64).abs().max()) < 1e-5


def test_bad_factor_shapes_are_named():
    with pytest.raises(ValueError, match="same r"):
        lowrank_svdvals(torch.randn(10, 4), torch.randn(5, 10))


def test_metrics_against_definitions():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0, 0.0])
    p = s[:4] / s.sum()
    assert effective_rank(s) == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    assert effective_rank(torch.ones(7)) == pytest.approx(7.0)
    assert effective_rank(torch.tensor([3.0, 0, 0])) == pytest.approx(1.0)
    assert stable_rank(s) == pytest.approx((16 + 4 + 1 + 1) / 16)
    assert energy_at(s, 1) == pytest.approx(16 / 22)
    assert energy_at(s, 2) == pytest.approx(20 / 22)
    assert energy_at(s, 10) == pytest.approx(1.0)
    assert rank_for_energy(s, 0.9) == 2            # 20/22 = 0.909
    assert rank_for_energy(s, 0.95) == 3           # 21/22 = 0.955
    assert rank_for_energy(s, 1.0) == 4            # the zero value adds nothing
    assert rank_for_energy(torch.tensor([1.0, 1.0]), 0.5) == 1   # exactly on the boundary
    with pytest.raises(ValueError, match="share"):
        rank_for_energy(s, 1.5)


def test_spectrum_result():
    B, A = torch.randn(40, 8), torch.randn(8, 30)
    sp = Spectrum.from_factors(B, A, 2.0, name="q_proj")
    dense = 2.0 * B.double() @ A.double()
    assert sp.shape == (40, 30) and len(sp) == 8
    assert sp.top == pytest.approx(float(torch.linalg.matrix_norm(dense, 2)))
    assert sp.frobenius == pytest.approx(float(dense.norm()))
    U, S, Vh = torch.linalg.svd(dense)
    cut = U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]
    assert sp.error_at(3) == pytest.approx(float((dense - cut).norm() / dense.norm()))
    assert 1 <= sp.effective_rank <= 8 and 1 <= sp.stable_rank <= 8
    text = repr(sp)
    assert "q_proj" in text and "40×30" in text and "effective rank" in text
    assert "<svg" in sp._repr_html_()
    with pytest.raises(Exception):
        sp.name = "other"                              # frozen


def test_phi_identical_subspaces_is_one():
    U = torch.linalg.qr(torch.randn(100, 12)).Q
    grid = subspace_similarity_grid(U, U)
    assert grid.shape == (12, 12)
    # φ(i, j) = min(i, j) / min(i, j) = 1 for nested subspaces of one basis
    torch.testing.assert_close(grid, torch.ones(12, 12, dtype=torch.float64))
    # a different basis of the same span: full-span φ is 1 again
    R = torch.linalg.qr(torch.randn(12, 12)).Q
    assert subspace_similarity(U, U @ R, 12, 12) == pytest.approx(1.0)


def test_phi_random_subspaces_is_about_max_ij_over_d():
    d, gen = 2000, torch.Generator().manual_seed(0)
    U1 = torch.linalg.qr(torch.randn(d, 8, generator=gen)).Q
    U2 = torch.linalg.qr(torch.randn(d, 64, generator=gen)).Q
    grid = subspace_similarity_grid(U1, U2)
    for i, j in [(8, 64), (4, 32), (8, 8)]:
        expected = max(i, j) / d
        assert grid[i - 1, j - 1] == pytest.approx(expected, rel=0.5)
        assert subspace_similarity(U1, U2, i, j) == pytest.approx(float(grid[i - 1, j - 1]))
    assert float(grid.max()) < 0.2


def test_phi_grid_matches_direct_formula():
    U1, U2 = torch.linalg.qr(torch.randn(30, 5)).Q, torch.linalg.qr(torch.randn(30, 7)).Q
    grid = subspace_similarity_grid(U1, U2)
    for i in range(1, 6):
        for j in range(1, 8):
            direct = float(torch.linalg.matrix_norm(U1[:, :i].T @ U2[:, :j]) ** 2 / min(i, j))
            assert float(grid[i - 1, j - 1]) == pytest.approx(direct)


def test_amplification_factor_definition():
    W = torch.randn(60, 40)
    B, A = torch.randn(60, 4), torch.randn(4, 40)
    amp = amplification_factor(W, B, A, 0.5)
    dense = 0.5 * B.double() @ A.double()
    U, S, Vh = torch.linalg.svd(dense)
    projected = (U[:, :4].T @ W.double() @ Vh[:4].T).norm()
    assert amp.k == 4
    assert amp.factor == pytest.approx(float(dense.norm() / projected))
    # a ΔW aligned with W's own top directions is barely "amplifying": factor ≈ ‖ΔW‖ / ‖W_top‖
    Uw, Sw, Vhw = torch.linalg.svd(W.double())
    aligned = amplification_factor(W, Uw[:, :4], torch.diag(Sw[:4]) @ Vhw[:4])
    assert aligned.factor == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shape"):
        amplification_factor(W.T, B, A)


def test_randomized_svd_matches_dense_on_decaying_spectrum():
    gen = torch.Generator().manual_seed(1)
    U = torch.linalg.qr(torch.randn(300, 60, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(200, 60, generator=gen, dtype=torch.float64)).Q
    s = 0.8 ** torch.arange(60, dtype=torch.float64)
    M = U @ torch.diag(s) @ V.T
    got = randomized_svdvals(M, 10)
    torch.testing.assert_close(got, s[:10], rtol=1e-6, atol=0)
    Ur, Sr, Vhr = randomized_svd(M, 10)
    torch.testing.assert_close(Ur.T @ Ur, torch.eye(10, dtype=torch.float64))
    cut = Ur @ torch.diag(Sr) @ Vhr
    best = float(s[10:].norm())                      # Eckart–Young optimum
    assert float((M - cut).norm()) == pytest.approx(best, rel=1e-4)
    with pytest.raises(ValueError, match="k = 0"):
        randomized_svd(M, 0)
