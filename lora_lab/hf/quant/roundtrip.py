"""Quantization error of real weights through bitsandbytes: the round trip W → Q(W) and its error.

* :func:`quant_error` — one weight, one scheme: NF4 / FP4 (bitsandbytes 4-bit, QLoRA §3);
  ``int8``, LLM.int8() as ``load_model(quant="int8")`` stores it (``Int8Params``: W cast to fp16,
  one absmax per row, ``int8_vectorwise_quant`` / ``int8_vectorwise_dequant``); ``int8-blockwise``
  (bitsandbytes' blockwise 8-bit with its dynamic code, as in 8-bit optimizers); and ``int4``
  (plain absmax, the baseline; pure torch).  Double quantization: bitsandbytes'
  ``compress_statistics`` (4-bit) and ``nested`` (blockwise 8-bit); LLM.int8() has none.
* :func:`lowrank_recovery` — what a rank-r LoRA correction (plain SVD or LoftQ) wins back.
* :func:`weight_histogram_data` — one weight's histogram and the scheme's levels for a typical
  block (:class:`~lora_lab.core.histogram.WeightHistogram`, drawn by
  :func:`lora_lab.viz.quant.weight_histogram`).

The scan of a whole model or checkpoint, one row per linear weight × scheme, is
:func:`lora_lab.hf.quant.scan.scan_quantization`.

Device: weights are analysed where they lie (bitsandbytes runs on CUDA and on the CPU).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from ...core.histogram import WeightHistogram, histogram_with_levels
from ...core.lowrank import RecoveryResult, recover_lowrank
from ...core.quant import (
    QuantError,
    RoundTrip,
    absmax_roundtrip,
    canonical_scheme,
    error_metrics,
)
from ...errors import LoraLabError
from ..model import heap

__all__ = [
    "BLOCKSIZES",
    "check_scheme",
    "code_points",
    "lowrank_recovery",
    "quant_error",
    "roundtrip",
    "stored_settings",
    "weight_histogram_data",
]

# bitsandbytes logs a harmless failure to fetch optional CPU kernels from the hub: silence it.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def _bnb():
    import bitsandbytes.functional as F

    return F


def check_scheme(scheme: str, blocksize: int) -> str:
    """The scheme's canonical name (``"llm.int8"`` → ``"int8"``); a LoraLabError unless ``scheme``
    and ``blocksize`` are ones lora_lab can quantize."""
    name = canonical_scheme(scheme)
    if blocksize not in BLOCKSIZES:
        raise LoraLabError(f"blocksize={blocksize!r} is not supported by bitsandbytes.",
                           f"pass one of {BLOCKSIZES} (QLoRA uses 64)")
    return name


def stored_settings(scheme: str, blocksize: int, double_quant: bool,
                    shape: tuple[int, ...]) -> tuple[int, bool]:
    """``(blocksize, double_quant)`` as the scheme really stores a weight of ``shape``: LLM.int8()
    (``int8``) keeps one absmax per row (the block is the row, ``shape[-1]`` values) and has no
    double quantization; every other scheme uses what was asked."""
    if canonical_scheme(scheme) == "int8":
        return (int(shape[-1]) if len(shape) else 1), False
    return blocksize, double_quant


QUANT_CHUNK = 1 << 20
"""Values quantized per bitsandbytes call.  Its CPU 4-bit path holds ~7 bytes of temporaries per
value (int64 bucket indices, an fp32 copy), 226 MB for one fp16 4096² weight; 1M values keep that
at ~14 MB.  Blocks are independent, so chunking changes nothing (a multiple of 256 blocks keeps
double quantization's 256-constant blocks whole too)."""


def _rt4_chunked(w: torch.Tensor, F, blocksize: int, quant_type: str, double_quant: bool,
                 chunk: int) -> torch.Tensor:
    """``dequantize_4bit(quantize_4bit(w))`` computed ``chunk`` values at a time.  Double
    quantization is done as bitsandbytes does it (QLoRA §3): over *all* constants, offset = mean,
    then 8-bit blockwise in blocks of 256."""
    flat = w.contiguous().view(-1)
    step = max(chunk // (blocksize * 256), 1) * blocksize * 256
    packed = []
    for i in range(0, flat.numel(), step):
        packed.append(F.quantize_4bit(flat[i:i + step], blocksize=blocksize, quant_type=quant_type))
        if flat.device.type == "cpu":
            heap.trim()  # glibc keeps bitsandbytes' freed 1-32 MB temporaries: RSS crept to 3.8×
            #              the largest fp32 tensor of a scan without this, 1.5× with it
    absmax = [st.absmax for _, st in packed]
    if double_quant:
        allmax = torch.cat(absmax)
        offset = allmax.mean()
        q8, st8 = F.quantize_blockwise(allmax - offset, blocksize=256)
        allmax = F.dequantize_blockwise(q8, st8) + offset
        absmax = list(allmax.split([len(a) for a in absmax]))
    out = torch.empty_like(flat)
    for i, (q, state), amax in zip(range(0, flat.numel(), step), packed, absmax):
        state.absmax = amax  # our own state object; bitsandbytes' CPU path has no out= variant
        out[i:i + step] = F.dequantize_4bit(q, state)
    return out.view(w.shape)


def _rt_llm_int8(w: torch.Tensor, F, chunk: int) -> torch.Tensor:
    """LLM.int8()'s stored weight, as ``Int8Params`` makes it (Dettmers et al. 2022, §3.1): W cast
    to fp16, then per row c = max|w| and CB = round(127·w / c) (``int8_vectorwise_quant``), read
    back as CB·c/127 (``int8_vectorwise_dequant``).  Rows are independent: ``chunk`` values at a
    time.  The outlier threshold (6.0) acts on the *inputs* at run time, not on W."""
    rows = w.reshape(-1, w.shape[-1]) if w.ndim else w.reshape(1, 1)
    out = torch.empty(rows.shape, dtype=w.dtype, device=w.device)
    step = max(chunk // max(rows.shape[1], 1), 1)
    for i in range(0, rows.shape[0], step):
        cb, scb, _ = F.int8_vectorwise_quant(rows[i:i + step].to(torch.float16))
        out[i:i + step] = F.int8_vectorwise_dequant(cb, scb)
    return out.view(w.shape)


def roundtrip(scheme: str, blocksize: int = 64, double_quant: bool = False,
              chunk: int = QUANT_CHUNK) -> RoundTrip:
    """The callable ``W -> Q(W)`` (quantize, then dequantize, same dtype and shape) for a scheme.
    4-bit schemes and ``int8`` run ``chunk`` values per bitsandbytes call (see :data:`QUANT_CHUNK`);
    ``int8`` (LLM.int8()) ignores ``blocksize`` and ``double_quant`` (see :func:`stored_settings`)."""
    scheme = check_scheme(scheme, blocksize)
    if scheme == "int4":
        return lambda w: absmax_roundtrip(w, 4, blocksize, double_quant)
    F = _bnb()
    if scheme == "int8":
        return lambda w: _rt_llm_int8(w, F, chunk)
    if scheme == "int8-blockwise":
        def rt8(w: torch.Tensor) -> torch.Tensor:
            q, state = F.quantize_blockwise(w.contiguous(), blocksize=blocksize, nested=double_quant)
            return F.dequantize_blockwise(q, state).view(w.shape)
        return rt8
    return lambda w: _rt4_chunked(w, F, blocksize, scheme, double_quant, chunk)


def code_points(scheme: str) -> torch.Tensor:
    """The scheme's code values on [−1, 1] (multiply by a block's absmax to get weights): the 16
    NF4 quantiles of N(0, 1) (QLoRA §3), the 16 FP4 values, LLM.int8()'s 255 uniform levels k/127,
    the 256 dynamic values of blockwise int8, 15 int4 levels."""
    scheme = check_scheme(scheme, 64)
    if scheme == "int4":
        return torch.arange(-7, 8, dtype=torch.float32) / 7
    if scheme == "int8":
        return torch.arange(-127, 128, dtype=torch.float32) / 127
    F = _bnb()
    if scheme == "int8-blockwise":
        return F.create_dynamic_map(signed=True).float().sort().values
    return F.get_4bit_type(scheme, device="cpu").float().sort().values


def weight_histogram_data(weight: torch.Tensor, scheme: str = "nf4", blocksize: int = 64,
                          bins: int = 200, name: str = "weight") -> WeightHistogram:
    """``weight``'s histogram (``bins`` bins, via ``torch.histc``) and ``scheme``'s
    :func:`code_points` times the median block absmax (blocks of ``blocksize``): the levels a
    typical block can represent (for ``int8``, LLM.int8(), a block is a row).  See
    :func:`lora_lab.core.histogram.histogram_with_levels`.

    >>> weight_histogram(weight_histogram_data(W, "nf4"))   # lora_lab.viz.quant draws it
    """
    scheme = check_scheme(scheme, blocksize)
    blocksize, _ = stored_settings(scheme, blocksize, False, tuple(weight.shape))
    return histogram_with_levels(weight, code_points(scheme), blocksize, bins, scheme=scheme,
                                 name=name)


def _check_weight(weight) -> None:
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.numel() == 0:
        got = f"{type(weight).__name__} {getattr(weight, 'dtype', '')}".strip()
        raise LoraLabError(f"quantization analysis needs a non-empty float tensor, got {got}.",
                           "pass a full-precision weight such as model.model.layers[0].mlp.up_proj"
                           ".weight (load the model without quant=...)")


def quant_error(weight: torch.Tensor, scheme: str, blocksize: int = 64,
                double_quant: bool = False) -> QuantError:
    """Quantize ``weight`` with ``scheme`` and measure the error (a :class:`QuantError`).

    >>> quant_error(torch.randn(1024, 1024), "nf4").mean_abs_error   # ≈ 0.073 (fp4: ≈ 0.097)

    For ``int8`` (LLM.int8()) the result's ``blocksize`` is the row length and ``double_quant``
    False, as the weight is really stored (:func:`stored_settings`).
    """
    _check_weight(weight)
    rt = roundtrip(scheme, blocksize, double_quant)
    scheme = canonical_scheme(scheme)
    w = weight.detach()
    bs, dq = stored_settings(scheme, blocksize, double_quant, tuple(w.shape))
    return error_metrics(w, rt(w), scheme=scheme, blocksize=bs, double_quant=dq)


def lowrank_recovery(weight: torch.Tensor, scheme: str | RoundTrip, ranks: Sequence[int] = (8, 16, 32, 64),
                     blocksize: int = 64, loftq_iters: int = 0, scaling: float = 1.0,
                     double_quant: bool = False, svd_method: str = "auto") -> RecoveryResult:
    """Remaining error after the best rank-r correction of E = W − Q(W), for each r in ``ranks``
    (one truncated SVD for all of them), and after ``loftq_iters`` LoftQ alternations with the
    LoRA scaling ``scaling`` = α/r.  ``scheme`` may also be a round-trip callable.
    See :func:`lora_lab.core.lowrank.recover_lowrank` for the math; ``result.corrections[r]`` holds
    A (r × in) and B (out × r) ready for peft's ``lora_A`` / ``lora_B``."""
    _check_weight(weight)
    if callable(scheme):
        rt, name = scheme, getattr(scheme, "__name__", "custom")
    else:
        rt, name = roundtrip(scheme, blocksize, double_quant), canonical_scheme(scheme)
    return recover_lowrank(weight.detach(), rt, ranks, scheme=name, loftq_iters=loftq_iters,
                           scaling=scaling, svd_method=svd_method)
