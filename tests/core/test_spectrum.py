"""Oracles for the factored spectrum math: everything is checked against a dense SVD."""

from __future__ import annotations

import math

import pytest
import torch

from lora_lab.core.randomized import randomized_svd, randomized_svdvals
from lora_lab.core.spectrum import (
    Spectrum,
    amplification_factor,
    dora_delta,
    effective_rank,
    energy_at,
    lowrank_svd,
    lowrank_svdvals,
    rank_for_energy,
    singular_directions,
    stable_rank,
    subspace_similarity,
    subspace_similarity_grid,
)


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
    A0 = A.clone()
    A0[5] = 0
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


# ----------------------------------------------------------------------------- LoRA §7.2: φ of A
def test_singular_directions_are_svd_columns_in_the_matrix_order():
    gen = torch.Generator().manual_seed(3)
    A = torch.randn(5, 40, generator=gen)
    U, S, Vh = torch.linalg.svd(A.double(), full_matrices=False)
    V = singular_directions(A)
    assert V.shape == (40, 5) and V.dtype == torch.float64
    torch.testing.assert_close(V.T @ V, torch.eye(5, dtype=torch.float64))
    torch.testing.assert_close((V.T @ Vh.T).abs(), torch.eye(5, dtype=torch.float64))  # up to sign
    left = singular_directions(A.T, "left")                 # the same vectors, up to sign
    torch.testing.assert_close((left.T @ V).abs(), torch.eye(5, dtype=torch.float64))
    deficient = torch.cat([A[:3], A[:2] * 2.0])            # rank 3: two rounding-level directions
    assert singular_directions(deficient).shape == (40, 3)
    assert singular_directions(torch.zeros(4, 10)).shape == (10, 0)
    with pytest.raises(ValueError, match="side"):
        singular_directions(A, "up")


def _paper_phi(A1, A2):
    """LoRA §7.2 written out: U_A = right singular vectors of A (torch.linalg.svd, A's order)."""
    V1 = torch.linalg.svd(A1.double(), full_matrices=False).Vh.T
    V2 = torch.linalg.svd(A2.double(), full_matrices=False).Vh.T
    return torch.tensor([[float(torch.linalg.matrix_norm(V1[:, :i].T @ V2[:, :j]) ** 2 / min(i, j))
                          for j in range(1, V2.shape[1] + 1)] for i in range(1, V1.shape[1] + 1)],
                        dtype=torch.float64)


def test_paper_phi_of_A_differs_from_delta_phi_below_full_rank():
    # A = D_a Vᵀ and B = U D_b: A orders V's columns by d_a, ΔW = U (D_b D_a) Vᵀ by d_b · d_a,
    # which reverses the order here.  A second adapter with the same V in A's order:
    gen = torch.Generator().manual_seed(0)
    V = torch.linalg.qr(torch.randn(50, 4, generator=gen, dtype=torch.float64)).Q
    U = torch.linalg.qr(torch.randn(30, 4, generator=gen, dtype=torch.float64)).Q
    A1 = torch.diag(torch.tensor([4.0, 3, 2, 1], dtype=torch.float64)) @ V.T
    B1 = U @ torch.diag(torch.tensor([0.1, 0.5, 2, 8], dtype=torch.float64))    # σ(ΔW): 8, 4, 1.5, 0.4
    A2, B2 = A1[:2].clone(), U[:, :2].clone()                                     # rank 2, same order
    paper = subspace_similarity_grid(singular_directions(A1), singular_directions(A2))
    torch.testing.assert_close(paper, _paper_phi(A1, A2))
    delta = subspace_similarity_grid(lowrank_svd(B1, A1)[2].T, lowrank_svd(B2, A2)[2].T)
    assert float(paper[0, 0]) == pytest.approx(1.0)      # A's top direction is A2's top direction
    assert float(delta[0, 0]) == pytest.approx(0.0, abs=1e-12)  # ΔW's top one is A's weakest
    # at full rank of the first adapter both see the same span: rotation invariant, equal
    torch.testing.assert_close(paper[3], delta[3])
    assert float(paper[3, 1]) == pytest.approx(1.0)


def test_paper_phi_on_random_factors_agrees_only_at_full_rank():
    gen = torch.Generator().manual_seed(1)
    r1, r2, d = 3, 6, 64
    A1, A2 = torch.randn(r1, d, generator=gen), torch.randn(r2, d, generator=gen)
    A2[:2] += 3 * A1[:2]                                   # shared directions, so φ is not ~random
    B1, B2 = torch.randn(32, r1, generator=gen), torch.randn(32, r2, generator=gen)
    paper = subspace_similarity_grid(singular_directions(A1), singular_directions(A2))
    torch.testing.assert_close(paper, _paper_phi(A1, A2))
    delta = subspace_similarity_grid(lowrank_svd(B1, A1, 2.0)[2].T, lowrank_svd(B2, A2, 0.5)[2].T)
    assert float(paper[r1 - 1, r2 - 1]) == pytest.approx(float(delta[r1 - 1, r2 - 1]), abs=1e-9)
    assert float((paper - delta).abs().max()) > 0.05       # below full rank the orders differ


# ----------------------------------------------------------------------------- DoRA
def test_dora_delta_is_merged_minus_base_and_full_rank():
    gen = torch.Generator().manual_seed(2)
    W, B, A = torch.randn(24, 16, generator=gen), torch.randn(24, 2, generator=gen), \
        torch.randn(2, 16, generator=gen)
    m = torch.linalg.norm(W, dim=1) * (1 + 0.1 * torch.randn(24, generator=gen))
    d = dora_delta(W, B, A, 0.5, m)
    V = W.double() + 0.5 * B.double() @ A.double()
    merged = m.double()[:, None] * V / torch.linalg.norm(V, dim=1, keepdim=True)  # DoRA §4
    torch.testing.assert_close(d, merged - W.double())
    assert Spectrum.from_matrix(d).numerical_rank == 16                # not rank 2
    rel = float((d - 0.5 * B.double() @ A.double()).norm() / d.norm())
    assert rel > 0.1
    # at init (m = ‖W‖_c, B = 0) DoRA changes nothing
    W64 = W.double()
    assert float(dora_delta(W64, torch.zeros(24, 2), A, 0.5, torch.linalg.norm(W64, dim=1)).abs().max()) \
        < 1e-12
    with pytest.raises(ValueError, match="out × in"):
        dora_delta(W.T, B, A, 0.5, m)


def test_spectrum_note_is_shown():
    sp = Spectrum.from_matrix(torch.randn(6, 4), "q", note="DoRA: true ΔW")
    assert len(sp) == 4 and sp.shape == (6, 4)
    assert "DoRA: true ΔW" in repr(sp) and "DoRA: true ΔW" in sp._repr_html_()
    assert "DoRA" not in repr(Spectrum.from_values([2.0, 1.0], (3, 3), "q"))
