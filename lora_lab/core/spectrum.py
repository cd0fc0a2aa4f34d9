"""The singular spectrum of a LoRA weight update, computed from its factors.

LoRA (Hu et al. 2021) learns ΔW = s · B · A with B: (m × r), A: (r × n) and r ≪ min(m, n).  ΔW has
rank ≤ r, so its whole spectrum lives in an r × r problem:

    B  = Q_B R_B            (QR, Q_B: m × r orthonormal, R_B: r × r)
    Aᵀ = Q_A R_A            (QR, Q_A: n × r orthonormal, R_A: r × r)
    s·B·A = Q_B (s · R_B R_Aᵀ) Q_Aᵀ,    s · R_B R_Aᵀ = U_c Σ V_cᵀ   (SVD of the r × r core)
    ⇒  ΔW = (Q_B U_c) Σ (Q_A V_c)ᵀ

Cost O((m + n) · r²) instead of O(m · n · min(m, n)); B · A is never formed.  At 4096², r = 16 this
is thousands of times faster than ``torch.linalg.svdvals(B @ A)`` (see ``benchmarks/spectrum.py``).

Precision: by default the factors are upcast to **float64** before the QR.  The QRs of tall-thin
(m × r) matrices cost little, and float64 gives singular values correct to ~1e-15 · σ₁ (for fp32 or
bf16 factors the rounding of the *stored* factors is then the only error left).  Pass
``dtype=torch.float32`` for speed on huge batches; fp32 agrees with float64 to ~1e-6 relative
on the top values.  Note that ``svdvals(B @ A)`` in fp32 is the *less* accurate method: forming the
product and its full SVD rounds the small singular values to ~1e-7 · σ₁.

Metrics on a spectrum σ₁ ≥ σ₂ ≥ … ≥ 0 (all in :class:`Spectrum`):

* effective rank (Roy & Vetterli 2007): exp(H(p)), p_i = σ_i / Σ σ_j, H the Shannon entropy;
* stable rank: ‖ΔW‖²_F / ‖ΔW‖²_2 = Σ σ_i² / σ₁²;
* energy at k: Σ_{i ≤ k} σ_i² / Σ σ_i², the share of ‖ΔW‖²_F kept by the best rank-k truncation
  (Eckart–Young), so the truncation's relative error is √(1 − energy(k)).

Subspace similarity and amplification (LoRA paper §7.2 and §7.3) are here too.

DoRA (Liu et al. 2024, §4) is the exception to "ΔW = s·B·A": its layer computes
W' = m · (W + s·B·A) / ‖W + s·B·A‖_c with a learned magnitude m, so the true update W' − W is in
general full rank and its spectrum must be computed densely (:func:`dora_delta`,
:meth:`Spectrum.from_matrix`).  The randomized SVD for other deltas that are not low-rank is in
:mod:`lora_lab.core.randomized`.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field

import torch

__all__ = [
    "Spectrum",
    "Amplification",
    "lowrank_svd",
    "lowrank_svdvals",
    "dora_delta",
    "singular_directions",
    "effective_rank",
    "stable_rank",
    "energy_at",
    "rank_for_energy",
    "subspace_similarity",
    "subspace_similarity_grid",
    "amplification_factor",
]


def _check_factors(B: torch.Tensor, A: torch.Tensor) -> None:
    if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(
            f"lowrank_svd needs B: (m × r) and A: (r × n) with the same r; got B {tuple(B.shape)} and "
            f"A {tuple(A.shape)}.  For a peft module pass B = lora_B.weight and A = lora_A.weight.")


def _core(B: torch.Tensor, A: torch.Tensor, scale: float, dtype):
    """QR both factors; return (Q_B, core, Q_A) with s·B·A = Q_B · core · Q_Aᵀ."""
    _check_factors(B, A)
    Qb, Rb = torch.linalg.qr(B.to(dtype), mode="reduced")     # (m × r'), (r' × r)
    Qa, Ra = torch.linalg.qr(A.T.to(dtype), mode="reduced")   # (n × r''), (r'' × r)
    return Qb, (Rb @ Ra.T) * float(scale), Qa                 # core: (r' × r'')


def lowrank_svd(B: torch.Tensor, A: torch.Tensor, scale: float = 1.0, *,
                dtype: torch.dtype = torch.float64):
    """Thin SVD of ΔW = scale · B · A from the factors: ``(U, S, Vh)``.

    B: (m × r), A: (r × n).  Returns U: (m × k), S: (k,), Vh: (k × n), k = min(m, n, r), S sorted
    descending, with U · diag(S) · Vh == scale · B · A.  Rank-deficient factors are fine: the extra
    singular values come out as (numerically) zero.  Computed in ``dtype`` (float64 by default).
    """
    Qb, core, Qa = _core(B, A, scale, dtype)
    Uc, S, Vhc = torch.linalg.svd(core, full_matrices=False)
    return Qb @ Uc, S, Vhc @ Qa.T


def lowrank_svdvals(B: torch.Tensor, A: torch.Tensor, scale: float = 1.0, *,
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Singular values of scale · B · A (B: m × r, A: r × n), descending, length min(m, n, r).

    Equal to the first min(m, n, r) values of ``torch.linalg.svdvals(scale * B @ A)`` (the rest of
    those are zero), at O((m + n) · r²) cost.  See the module docstring for the precision choice.
    """
    _, core, _ = _core(B, A, scale, dtype)
    return torch.linalg.svdvals(core)


def dora_delta(W: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scale: float,
               magnitude: torch.Tensor, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The true update W' − W (out × in, dense) of a DoRA layer.

    DoRA (Liu et al. 2024, §4) splits the weight into a magnitude and a direction:

        W' = m · (W + s·B·A) / ‖W + s·B·A‖_c

    W: (out × in) base weight, B: (out × r), A: (r × in), m: (out,) the learned magnitude.  ‖·‖_c is
    the norm of each weight vector of one output feature (a column in the paper's d × k layout, a row
    of peft's out × in weight: ``torch.linalg.norm(W + s·B·A, dim=1)``).  With g = m / ‖W + s·B·A‖_c:

        W' − W = (g − 1) ⊙ W + g ⊙ s·B·A        (⊙: row i scaled by g_i)

    which is computed in this form (in ``dtype``, float64 by default), not as a difference of two
    nearly equal matrices.  At init m = ‖W‖_c and B = 0, so g = 1 and the update is 0; once m moves,
    (g − 1) ⊙ W = diag(g − 1) · W carries the rank of W: the update is full rank, not rank r, and
    s·B·A alone can be far from it.  Cost O(out · in · r); its spectrum needs a dense SVD.
    """
    if tuple(W.shape) != (B.shape[0], A.shape[1]) or magnitude.numel() != W.shape[0]:
        raise ValueError(f"dora_delta needs W: (out × in), B: (out × r), A: (r × in), m: (out,); got "
                         f"W {tuple(W.shape)}, B {tuple(B.shape)}, A {tuple(A.shape)}, "
                         f"m {tuple(magnitude.shape)}.  Pass the base weight as (out × in).")
    W, lora = W.to(dtype), float(scale) * (B.to(dtype) @ A.to(dtype))
    g = magnitude.to(dtype).flatten() / torch.linalg.norm(W + lora, dim=1)     # (out,)
    return (g - 1)[:, None] * W + g[:, None] * lora


# ----------------------------------------------------------------------------- metrics on σ
def _sigma(values) -> torch.Tensor:
    s = torch.as_tensor(values).detach().to("cpu", torch.float64).flatten()
    return torch.sort(s.abs(), descending=True).values


def effective_rank(values) -> float:
    """Roy & Vetterli (2007): exp(−Σ p_i log p_i) with p_i = σ_i / Σ σ_j (0 · log 0 = 0).

    Between 1 (one direction) and the number of nonzero σ (all equal).  0.0 for a zero matrix.
    """
    s = _sigma(values)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def stable_rank(values) -> float:
    """‖M‖²_F / ‖M‖²_2 = Σ σ_i² / σ₁²; ≤ rank(M), and robust to tiny σ.  0.0 for a zero matrix."""
    s = _sigma(values)
    if s.numel() == 0 or s[0] <= 0:
        return 0.0
    return float((s ** 2).sum() / s[0] ** 2)


def _cumulative_energy(s: torch.Tensor) -> torch.Tensor:
    """c[k-1] = Σ_{i ≤ k} σ_i² / Σ σ_i²  (k = 1..len).  A zero matrix counts as fully captured."""
    e = s ** 2
    total = e.sum()
    if total <= 0:
        return torch.ones_like(s)
    return torch.cumsum(e, 0) / total


def energy_at(values, k: int) -> float:
    """Share of ‖M‖²_F captured by the top-k singular directions (0 for k = 0, 1 for k ≥ rank)."""
    s = _sigma(values)
    if k <= 0:
        return 0.0 if s.numel() and s[0] > 0 else 1.0
    return float(_cumulative_energy(s)[min(k, s.numel()) - 1])


def rank_for_energy(values, share: float = 0.9) -> int:
    """Smallest k whose top-k directions capture ``share`` of ‖M‖²_F (0 for a zero matrix)."""
    if not 0.0 < share <= 1.0:
        raise ValueError(f"share = {share!r} must be in (0, 1], e.g. 0.9 for 90% of the energy.")
    s = _sigma(values)
    if s.numel() == 0 or s[0] <= 0:
        return 0
    c = _cumulative_energy(s)
    k = int(torch.searchsorted(c, torch.tensor([share - 1e-12], dtype=c.dtype)).item()) + 1
    return min(k, s.numel())


# ----------------------------------------------------------------------------- result
@dataclass(frozen=True, eq=False)
class Spectrum:
    """Singular values of one weight update ΔW (m × n), with the usual rank metrics.

    ``values``: float64 CPU tensor, descending.  ``shape``: (m, n) of ΔW.  ``name``: optional label.
    ``note``: what ΔW is when it is not the plain s·B·A (e.g. ``"DoRA: true ΔW incl. magnitude (full
    rank)"``); every repr and figure shows it.  Build with :meth:`from_factors` (LoRA factors),
    :meth:`from_matrix` (a dense ΔW, e.g. :func:`dora_delta`) or :meth:`from_values`.
    """

    values: torch.Tensor
    shape: tuple[int, int]
    name: str = ""
    note: str = ""
    effective_rank: float = field(init=False)
    stable_rank: float = field(init=False)
    cumulative_energy: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        s = _sigma(self.values)
        object.__setattr__(self, "values", s)
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "effective_rank", effective_rank(s))
        object.__setattr__(self, "stable_rank", stable_rank(s))
        object.__setattr__(self, "cumulative_energy", _cumulative_energy(s))

    @classmethod
    def from_factors(cls, B, A, scale: float = 1.0, name: str = "") -> "Spectrum":
        """Spectrum of scale · B · A, via :func:`lowrank_svdvals` (float64)."""
        return cls(lowrank_svdvals(B, A, scale), (B.shape[0], A.shape[1]), name)

    @classmethod
    def from_matrix(cls, delta: torch.Tensor, name: str = "", note: str = "") -> "Spectrum":
        """Spectrum of a dense ΔW (m × n): ``torch.linalg.svdvals`` in float64, all min(m, n)
        values.  O(m · n · min(m, n)): for updates with no low-rank factors, such as DoRA's."""
        if delta.ndim != 2:
            raise ValueError(f"from_matrix needs a 2-D ΔW; got shape {tuple(delta.shape)}.")
        values = torch.linalg.svdvals(delta.detach().to(torch.float64))
        return cls(values, tuple(delta.shape), name, note)

    @classmethod
    def from_values(cls, values, shape, name: str = "", note: str = "") -> "Spectrum":
        return cls(torch.as_tensor(values), tuple(shape), name, note)

    @property
    def top(self) -> float:
        """σ₁ = ‖ΔW‖₂, the spectral norm."""
        return float(self.values[0]) if self.values.numel() else 0.0

    @property
    def frobenius(self) -> float:
        """‖ΔW‖_F = √Σ σ_i²."""
        return float(self.values.norm())

    @property
    def numerical_rank(self) -> int:
        """Count of σ_i > max(m, n) · eps64 · σ₁ (numpy's matrix_rank rule)."""
        tol = max(self.shape) * torch.finfo(torch.float64).eps * self.top
        return int((self.values > tol).sum()) if self.top > 0 else 0

    def energy_at(self, k: int) -> float:
        """Share of ‖ΔW‖²_F kept by the best rank-k approximation."""
        if k <= 0:
            return 0.0 if self.top > 0 else 1.0
        return float(self.cumulative_energy[min(k, len(self.values)) - 1])

    def error_at(self, k: int) -> float:
        """Relative Frobenius error ‖ΔW − ΔW_k‖_F / ‖ΔW‖_F = √(1 − energy(k)) of the rank-k cut."""
        return math.sqrt(max(0.0, 1.0 - self.energy_at(k)))

    def rank_for_energy(self, share: float = 0.9) -> int:
        """Smallest k capturing ``share`` of the energy (0.9 → "k90", 0.99 → "k99")."""
        return rank_for_energy(self.values, share)

    def numpy(self):
        return self.values.numpy()

    def __len__(self) -> int:
        return len(self.values)

    def __repr__(self) -> str:
        m, n = self.shape
        label = f"{self.name}: " if self.name else ""
        note = f", {self.note}" if self.note else ""
        return (f"Spectrum({label}{m}×{n}, {len(self.values)} values, σ₁={self.top:.4g}, "
                f"effective rank {self.effective_rank:.2f}, stable rank {self.stable_rank:.2f}, "
                f"k90={self.rank_for_energy(0.9)}, k99={self.rank_for_energy(0.99)}{note})")

    def _repr_html_(self) -> str:
        s = self.values[: 64]
        top = max(self.top, 1e-300)
        bars = "".join(
            f'<rect x="{3 * i}" y="{40 - 40 * float(v) / top:.1f}" width="2" '
            f'height="{40 * float(v) / top:.1f}" fill="#4c78a8"/>' for i, v in enumerate(s))
        svg = f'<svg width="{3 * len(s)}" height="40">{bars}</svg>'
        rows = [("shape", f"{self.shape[0]}×{self.shape[1]}"), ("σ₁", f"{self.top:.4g}"),
                ("‖ΔW‖_F", f"{self.frobenius:.4g}"),
                ("effective rank", f"{self.effective_rank:.2f}"),
                ("stable rank", f"{self.stable_rank:.2f}"),
                ("k for 90% / 99% energy",
                 f"{self.rank_for_energy(0.9)} / {self.rank_for_energy(0.99)}")]
        body = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in rows)
        title = f"<b>Spectrum {self.name}</b>" if self.name else "<b>Spectrum</b>"
        if self.note:
            title += f" <i>({html.escape(self.note)})</i>"
        return f"<div>{title}<br>{svg}<table>{body}</table></div>"


# ----------------------------------------------------------------------------- LoRA paper §7
def _orthonormal_columns(U: torch.Tensor, name: str) -> torch.Tensor:
    if U.ndim != 2:
        raise ValueError(f"{name} must be a (d × k) matrix of orthonormal columns; got {tuple(U.shape)}.")
    return U.to(torch.float64)


def singular_directions(M: torch.Tensor, side: str = "right", *,
                        dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """M's singular vectors as orthonormal columns, sorted by M's own singular values, descending.

    M: (p × q).  ``side="right"``: V (q × k), the columns of Vᵀ's rows; ``"left"``: U (p × k).
    Directions whose σ is at rounding level (σ ≤ max(p, q) · eps · σ₁, eps of M's dtype: numpy's
    matrix_rank rule) are dropped, so k is M's numerical rank (0 for a zero M).

    The LoRA paper's subspace similarity (§7.2) takes these of the factor A (r × in), ``side="right"``:
    U_A = the right-singular unitary matrix of A, columns ordered by A's singular values.
    """
    if M.ndim != 2 or side not in ("right", "left"):
        raise ValueError(f"singular_directions needs a 2-D matrix and side 'right' or 'left'; got "
                         f"shape {tuple(M.shape)}, side={side!r}.")
    U, S, Vh = torch.linalg.svd(M.detach().to(dtype), full_matrices=False)
    eps = torch.finfo(M.dtype).eps if M.dtype.is_floating_point else torch.finfo(dtype).eps
    keep = int((S > S[0] * max(M.shape) * eps).sum()) if S.numel() and S[0] > 0 else 0
    return Vh[:keep].T if side == "right" else U[:, :keep]


def subspace_similarity_grid(U1: torch.Tensor, U2: torch.Tensor) -> torch.Tensor:
    """φ(U1, U2, i, j) for all i ≤ k1, j ≤ k2 (LoRA paper §7.2, figures 3 and 4).

    U1: (d × k1), U2: (d × k2), orthonormal columns sorted by singular value.  The paper's φ takes
    U = the right singular vectors of each adapter's A (r × in), ordered by A's singular values:
    ``singular_directions(A)``.  The right singular vectors of ΔW = s·B·A (``Vh.T`` of
    :func:`lowrank_svd`) span the same space when B has full column rank, so φ(r1, r2) agrees, but
    they are ordered by ΔW's singular values, so φ(i, j) below full rank differs.

    Returns a (k1 × k2) float64 grid with grid[i-1, j-1] = ‖U1[:, :i]ᵀ U2[:, :j]‖²_F / min(i, j),
    in [0, 1]: 1 when one span contains the other, about max(i, j) / d for random subspaces.  One
    k1 × k2 product plus a 2-D cumulative sum, so O(d · k1 · k2).
    """
    U1, U2 = _orthonormal_columns(U1, "U1"), _orthonormal_columns(U2, "U2")
    if U1.shape[0] != U2.shape[0]:
        raise ValueError(f"U1 and U2 must live in the same space; got {U1.shape[0]} and "
                         f"{U2.shape[0]} rows.  Compare the same module of two adapters.")
    overlap = (U1.T @ U2) ** 2                       # (k1 × k2): squared cosines
    cum = overlap.cumsum(0).cumsum(1)                # cum[i-1, j-1] = ‖U1[:, :i]ᵀ U2[:, :j]‖²_F
    i = torch.arange(1, U1.shape[1] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, U2.shape[1] + 1, dtype=torch.float64)[None, :]
    return cum / torch.minimum(i, j)


def subspace_similarity(U1: torch.Tensor, U2: torch.Tensor, i: int, j: int) -> float:
    """φ(U1, U2, i, j) = ‖U1[:, :i]ᵀ U2[:, :j]‖²_F / min(i, j) (LoRA paper §7.2)."""
    if not (1 <= i <= U1.shape[1] and 1 <= j <= U2.shape[1]):
        raise ValueError(f"need 1 ≤ i ≤ {U1.shape[1]} and 1 ≤ j ≤ {U2.shape[1]}; got i={i}, j={j}.")
    U1, U2 = _orthonormal_columns(U1, "U1"), _orthonormal_columns(U2, "U2")
    return float(((U1[:, :i].T @ U2[:, :j]) ** 2).sum() / min(i, j))


@dataclass(frozen=True)
class Amplification:
    """LoRA paper §7.3: how strongly ΔW amplifies the directions of W it acts on.

    ``factor`` = ‖ΔW‖_F / ‖Uᵀ W V‖_F, with U, V the top-k singular vectors of ΔW.  A large factor
    (the paper finds ≈ 21 for r = 4 on GPT-3's W_q) means ΔW boosts directions that W itself barely
    uses.  ``random_projection`` is ‖U_rᵀ W V_r‖_F for random orthonormal U_r, V_r of the same size,
    the baseline the paper compares against.
    """

    factor: float
    delta_norm: float
    projected_norm: float
    weight_norm: float
    random_projection: float
    k: int

    def __repr__(self) -> str:
        return (f"Amplification(factor={self.factor:.3g}: ‖ΔW‖_F={self.delta_norm:.4g}, "
                f"‖UᵀWV‖_F={self.projected_norm:.4g} (random directions {self.random_projection:.4g}), "
                f"‖W‖_F={self.weight_norm:.4g}, k={self.k})")


def amplification_factor(W: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scale: float = 1.0,
                         k: int | None = None, *, seed: int = 0) -> Amplification:
    """‖ΔW‖_F / ‖Uᵀ W V‖_F for ΔW = scale · B · A and W: (m × n) the (dequantized) base weight.

    U: (m × k), V: (n × k) are ΔW's top-k singular vectors (k defaults to r).  LoRA paper §7.3.
    """
    if tuple(W.shape) != (B.shape[0], A.shape[1]):
        raise ValueError(f"W has shape {tuple(W.shape)} but ΔW = B·A has shape "
                         f"{(B.shape[0], A.shape[1])}; pass the base weight of the same module "
                         "(out × in, transposed for Conv1D).")
    U, S, Vh = lowrank_svd(B, A, scale)
    k = min(k or len(S), len(S))
    W64 = W.detach().to(torch.float64)
    projected = float((U[:, :k].T @ W64 @ Vh[:k].T).norm())
    gen = torch.Generator().manual_seed(seed)
    Ur = torch.linalg.qr(torch.randn(W.shape[0], k, generator=gen, dtype=torch.float64))[0]
    Vr = torch.linalg.qr(torch.randn(W.shape[1], k, generator=gen, dtype=torch.float64))[0]
    random = float((Ur.T @ W64.to(Ur.device) @ Vr).norm())
    delta = float(S.norm())
    factor = delta / projected if projected > 0 else math.inf
    return Amplification(factor, delta, projected, float(W64.norm()), random, k)
