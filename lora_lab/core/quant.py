"""Quantization error and what a low-rank correction wins back: pure torch, no bitsandbytes.

A blockwise quantizer cuts a weight W (out × in, flattened) into blocks of ``blocksize`` values,
stores one absmax constant c_b = max|w| per block and a k-bit code per value:
W ≈ Q(W) = c_b · code[idx].  Everything here takes the quantizer as a *round trip* callable
``W -> Q(W)`` (quantize then dequantize, same shape), so the math is the same for bitsandbytes'
formats (see :mod:`lora_lab.hf.quant.roundtrip`) and for the pure-torch absmax int4 baseline below.

The schemes (:data:`SCHEMES`, described in :data:`SCHEME_NOTES`):

* ``nf4``, ``fp4`` — bitsandbytes 4-bit (QLoRA §3), what ``load_model(quant="nf4"|"fp4")`` stores.
* ``int8`` — LLM.int8() (Dettmers et al. 2022), what ``load_model(quant="int8")`` stores: one absmax
  per *row* (the block is a whole row, so ``blocksize`` is the row length and double quantization
  does not apply).  ``"llm.int8"`` is accepted as another name for it.
* ``int8-blockwise`` — bitsandbytes' blockwise 8-bit with its dynamic code, as in 8-bit optimizers.
  No ``load_model`` option stores weights this way.
* ``int4`` — plain symmetric absmax int4, the baseline NF4 beats (not a bitsandbytes format).

* :func:`error_metrics` — relative Frobenius error, mean/max |E|, SNR, outlier share, E = W − Q(W).
* :func:`bits_per_param` — code bits plus the constants (QLoRA paper §3: 4 + 32/64 = 4.5 bits at
  blocksize 64; double quantization stores the constants in 8 bits: 4 + 8/64 + 32/(64·256) ≈ 4.127).
* :func:`absmax_roundtrip` — the plain symmetric absmax int-k baseline (levels −(2^(k−1)−1) … +).
* :func:`lora_lab.core.lowrank.recover_lowrank` — best rank-r correction of E from ONE truncated SVD
  for all ranks (Eckart–Young), and the LoftQ alternation (Li et al. 2023, Alg. 1) that respects
  the LoRA scaling.
* :func:`levels_per_block` — distinct values per 32 weights: ≤ 16 means W is already 4-bit rounded.
* :func:`module_order` — module types in the order models list them (q, k, v, o, gate, up, down).

No function here prints, probes devices or moves tensors: work happens where the weight lies.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import LoraLabError

__all__ = [
    "MODULE_ORDER",
    "OUTLIER_SIGMAS",
    "SCHEMES",
    "SCHEME_NOTES",
    "QuantError",
    "RoundTrip",
    "absmax_roundtrip",
    "bits_per_param",
    "block_absmax",
    "canonical_scheme",
    "error_metrics",
    "levels_per_block",
    "module_order",
    "weight_stats",
]

RoundTrip = Callable[[torch.Tensor], torch.Tensor]
"""``W -> Q(W)``: quantize then dequantize; same shape as W (any float dtype)."""

SCHEMES = ("nf4", "fp4", "int8", "int8-blockwise", "int4")
SCHEME_NOTES = {
    "nf4": "4-bit NormalFloat (QLoRA §3): what load_model(quant='nf4') stores",
    "fp4": "4-bit float: what load_model(quant='fp4') stores",
    "int8": "LLM.int8(): one absmax per row, what load_model(quant='int8') stores (blocksize and "
            "double quant do not apply); at run time it also rounds the layer inputs to int8, "
            "which quantized_output_error includes and a weight scan cannot",
    "int8-blockwise": "bitsandbytes' blockwise 8-bit with its dynamic code (as in 8-bit "
                      "optimizers); no load_model option stores weights this way",
    "int4": "plain symmetric absmax int4, the baseline (not a bitsandbytes format)",
}
_ALIASES = {"llm.int8": "int8"}
CODE_BITS = {"nf4": 4, "fp4": 4, "int4": 4, "int8": 8, "int8-blockwise": 8}
OUTLIER_SIGMAS = 6.0
MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""A decoder layer's linear modules in the order Llama-style models list them."""
_CHUNK = 1 << 20  # elements per reduction chunk: fp32 temporaries of 4 MB


def canonical_scheme(scheme: str) -> str:
    """The scheme's name in :data:`SCHEMES` (``"llm.int8"`` is ``"int8"``); a LoraLabError for an
    unknown one."""
    name = _ALIASES.get(scheme, scheme) if isinstance(scheme, str) else scheme
    if name not in CODE_BITS:
        raise LoraLabError(f"scheme={scheme!r} is not a quantization scheme lora_lab knows.",
                           f"pass one of {SCHEMES} (int8 is LLM.int8(), as load_model(quant='int8'); "
                           "int8-blockwise is bitsandbytes' blockwise 8-bit)")
    return name


def module_order(modules) -> list[str]:
    """The distinct module types of ``modules``: those in :data:`MODULE_ORDER` first, in that order,
    then the others in first-seen order.  Every layers × modules heatmap uses it."""
    seen = list(dict.fromkeys(modules))
    return ([m for m in MODULE_ORDER if m in seen] + [m for m in seen if m not in MODULE_ORDER])


# ------------------------------------------------------------------ accounting ----------------
def bits_per_param(scheme: str, blocksize: int = 64, double_quant: bool = False,
                   numel: int | None = None) -> float:
    """Storage bits per weight, constants included.

    Without double quantization each block of ``blocksize`` codes carries one fp32 absmax:
    ``code_bits + 32/blocksize``.  With it (QLoRA §3) the constants are stored in 8 bits after
    subtracting their mean, with one fp32 scale per ``blocksize2`` constants (256 for bitsandbytes'
    4-bit, ``blocksize`` for its 8-bit blockwise) plus one fp32 offset per tensor:
    ``code_bits + 8/blocksize + 32/(blocksize·blocksize2) + 32/numel``.
    With ``numel`` the count is exact (partial last blocks); without it, the asymptotic value.
    ``int8`` (LLM.int8()) stores one fp32 absmax per row: pass the row length as ``blocksize``;
    it has no double quantization.
    """
    scheme = canonical_scheme(scheme)
    double_quant = double_quant and scheme != "int8"
    n = numel if numel else None
    nblocks = math.ceil(n / blocksize) if n else None
    bits = CODE_BITS[scheme]
    if not double_quant:
        return bits + (32 * nblocks / n if n else 32 / blocksize)
    bs2 = blocksize if scheme == "int8-blockwise" else 256
    if not n:
        return bits + 8 / blocksize + 32 / (blocksize * bs2)
    return bits + (8 * nblocks + 32 * math.ceil(nblocks / bs2) + 32) / n


# ------------------------------------------------------------------ metrics -------------------
@dataclass(frozen=True)
class QuantError:
    """How far Q(W) is from W, for one weight and one scheme.  E = W − Q(W).

    rel_error = ‖E‖_F / ‖W‖_F;  snr_db = 10·log10(‖W‖²/‖E‖²);  outlier_share = share of |w| > 6σ
    (σ = std of W); bits_per_param includes the quantization constants (see :func:`bits_per_param`).
    """

    scheme: str
    blocksize: int
    double_quant: bool
    shape: tuple[int, ...]
    rel_error: float
    mean_abs_error: float
    max_abs_error: float
    snr_db: float
    outlier_share: float
    bits_per_param: float

    def __repr__(self) -> str:
        dq = "+dq" if self.double_quant else ""
        return (f"QuantError({self.scheme}{dq} bs={self.blocksize} {tuple(self.shape)}: "
                f"rel={self.rel_error:.4f} mean|E|={self.mean_abs_error:.4g} "
                f"max|E|={self.max_abs_error:.4g} SNR={self.snr_db:.2f} dB "
                f"outliers={self.outlier_share:.2e} bits/param={self.bits_per_param:.3f})")

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><th style='text-align:left'>{k}</th><td>{v}</td></tr>"
                       for k, v in self.to_dict().items())
        return f"<table><caption>QuantError</caption>{rows}</table>"

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class WeightStats:
    """Statistics of W that do not depend on the scheme (computed once per tensor)."""

    numel: int
    sum_sq: float
    outlier_share: float


def _chunks(t: torch.Tensor):
    flat = t.reshape(-1)
    for i in range(0, flat.numel(), _CHUNK):
        yield flat[i:i + _CHUNK]


def _buffer(t: torch.Tensor) -> torch.Tensor:
    """One fp32 scratch chunk, reused for every chunk: no allocation churn per chunk."""
    return torch.empty(min(t.numel(), _CHUNK), dtype=torch.float32, device=t.device)


def weight_stats(weight: torch.Tensor) -> WeightStats:
    """‖W‖² and the share of |w| > 6σ.  Reductions run over 1M-element chunks in one reused
    fp32 buffer (no full-size fp32 copy of an fp16 W is made) and are summed across chunks in
    fp64; the outlier count needs a second pass only when max |w| > 6σ."""
    n, buf, rows = weight.numel(), _buffer(weight), []
    for c in _chunks(weight):
        b = buf[: c.numel()].copy_(c)
        s1, l2 = b.sum(), torch.linalg.vector_norm(b)
        rows.append(torch.stack([s1, l2, b.abs_().max()]))
    s1, l2, linf = torch.stack(rows).double().unbind(1)
    s1, s2, wmax = s1.sum().item(), (l2 ** 2).sum().item(), linf.max().item()
    mean = s1 / n
    sigma = math.sqrt(max(s2 / n - mean * mean, 0.0))
    limit = OUTLIER_SIGMAS * sigma
    outliers = 0
    if sigma and wmax > limit:
        outliers = sum(int((buf[: c.numel()].copy_(c).abs_() > limit).sum())
                       for c in _chunks(weight))
    return WeightStats(numel=n, sum_sq=s2, outlier_share=outliers / n)


def error_metrics(weight: torch.Tensor, recon: torch.Tensor, *, scheme: str, blocksize: int,
                  double_quant: bool = False, stats: WeightStats | None = None,
                  bits: float | None = None) -> QuantError:
    """:class:`QuantError` of ``recon`` = Q(W) against ``weight`` = W (same shape, any float dtype).

    E is formed chunk by chunk in one reused fp32 buffer (1M elements: 4 MB whatever the tensor
    size); ‖E‖₂, Σ|e| and max|e| are reduced per chunk in fp32 and summed across chunks in fp64
    (relative accuracy ~1e-6).  ``stats`` (from :func:`weight_stats`) can be shared across schemes.
    """
    if recon.shape != weight.shape:
        raise LoraLabError(f"Q(W) has shape {tuple(recon.shape)} but W has {tuple(weight.shape)}.",
                           "the round trip must return a tensor shaped like its input")
    stats = stats or weight_stats(weight)
    buf, rows = _buffer(weight), []
    for w, q in zip(_chunks(weight), _chunks(recon)):
        e = buf[: w.numel()].copy_(q).sub_(w)  # E = Q − W in fp32; the inputs are never written
        l2 = torch.linalg.vector_norm(e)
        e.abs_()  # sum() is cascaded (accurate in fp32); vector_norm(e, 1) is not
        rows.append(torch.stack([l2, e.sum(), e.max()]))
    l2, l1, linf = torch.stack(rows).double().unbind(1)
    e2, e1, emax = (l2 ** 2).sum().item(), l1.sum().item(), linf.max().item()
    n = stats.numel
    rel = math.sqrt(e2 / stats.sum_sq) if stats.sum_sq > 0 else (0.0 if e2 == 0 else math.inf)
    snr = 10 * math.log10(stats.sum_sq / e2) if e2 > 0 else math.inf
    bits = bits if bits is not None else bits_per_param(scheme, blocksize, double_quant, n)
    return QuantError(scheme=scheme, blocksize=int(blocksize), double_quant=bool(double_quant),
                      shape=tuple(weight.shape), rel_error=rel, mean_abs_error=e1 / n,
                      max_abs_error=emax, snr_db=snr, outlier_share=stats.outlier_share,
                      bits_per_param=bits)


PREQUANT_BLOCK = 32
"""GGUF's k-bit formats store blocks of 32 weights (Q4_0, Q4_1; Q4_K in sub-blocks of 32)."""


def levels_per_block(weight: torch.Tensor, block: int = PREQUANT_BLOCK,
                     max_blocks: int = 1024) -> float:
    """Median number of distinct values among ``block`` consecutive (flattened) weights, over up
    to ``max_blocks`` blocks spread evenly across W (one sort of max_blocks × block values).

    Trained fp16/bf16/fp32 weights give close to ``block`` (32); weights that went through a 4-bit
    format (a GGUF Q4_0/Q4_1/Q4_K checkpoint converted back to fp32, say) give at most 16.  On such
    weights a re-quantization's error says how well a scheme fits the *old grid*, not the model:
    NF4 can show lower weight error than FP4 and still move the logits more.
    """
    flat = weight.detach().reshape(-1)
    nblocks = flat.numel() // block
    if nblocks == 0:
        return float(torch.unique(flat).numel())
    pick = torch.linspace(0, nblocks - 1, min(nblocks, max_blocks), device=flat.device).long()
    blocks = flat[: nblocks * block].view(nblocks, block)
    blocks = blocks.index_select(0, pick)          # not blocks[pick]: ~100× slower on CPU
    blocks = blocks.float().sort(dim=1).values
    distinct = 1 + (blocks[:, 1:] != blocks[:, :-1]).sum(dim=1)
    return float(distinct.float().median().item())


# ------------------------------------------------------------------ absmax baseline -----------
def _blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """(nblocks × blocksize) view of a flat tensor, zero-padding the last block."""
    pad = (-flat.numel()) % blocksize
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, blocksize)


def block_absmax(weight: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """The per-block constants c_b = max |w| over each run of ``blocksize`` flattened values."""
    return _blocks(weight.reshape(-1).float(), blocksize).abs().amax(dim=1)


def _absmax_codes(blocks: torch.Tensor, absmax: torch.Tensor, bits: int) -> torch.Tensor:
    """round(w / c · L) · c / L, clamped to ±L with L = 2^(bits−1) − 1 (symmetric: int4 uses
    −7 … 7, 15 of its 16 codes).  ``blocks``: nblocks × blocksize, ``absmax``: nblocks × 1."""
    levels = 2 ** (bits - 1) - 1
    scale = absmax / levels
    codes = torch.round(blocks / scale.clamp_min(torch.finfo(blocks.dtype).tiny))
    return codes.clamp_(-levels, levels) * scale


def absmax_roundtrip(weight: torch.Tensor, bits: int = 4, blocksize: int = 64,
                     double_quant: bool = False) -> torch.Tensor:
    """Q(W) for plain symmetric absmax int-``bits`` quantization, blockwise (the baseline NF4 beats).

    Each block stores round(w / c · L) with L = 2^(bits−1) − 1 and c = max|w|; Q = code · c / L.
    With ``double_quant`` the constants are themselves quantized (QLoRA §3): their mean is removed
    and the rest stored as absmax int8 in blocks of 256.  Returns W's dtype and shape.
    """
    flat = weight.reshape(-1).float()
    blocks = _blocks(flat, blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    if double_quant:
        offset = absmax.mean()
        consts = _blocks((absmax - offset).reshape(-1), 256)
        deq = _absmax_codes(consts, consts.abs().amax(dim=1, keepdim=True), 8)
        absmax = deq.reshape(-1)[: absmax.numel()].view_as(absmax) + offset
    out = _absmax_codes(blocks, absmax, bits).reshape(-1)[: flat.numel()]
    return out.view(weight.shape).to(weight.dtype)
