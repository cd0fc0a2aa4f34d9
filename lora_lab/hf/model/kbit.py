"""Keep 4-bit layers exact and trainable on CPU.

bitsandbytes 0.50's ``Linear4bit.forward`` repacks its weight into a CPU-friendly layout the first
time it runs in eval mode on an input that needs no gradient, on CPUs with AVX512-BF16.  That
repacking hurts in three ways (measured on builtin:tiny, NF4):

* it never unpacks when training resumes, and the packed path (``gemv_4bit``) has no autograd
  kernel: the gradient to the layer's *input* is silently dropped, so every LoRA factor below the
  last 4-bit layer stops learning after any evaluation, ``task_accuracy`` or generation;
* it is lossy: the block scales become bf16 and, with double quantization, are re-quantized on the
  way back (logits move by ~5e-3 relative); without double quantization bitsandbytes' own inverse
  leaves the scales transposed, and the logits after it are 74% off;
* peft's DoRA reads the base weight through ``dequantize_4bit``, which does not know the packed
  layout: a QLoRA+DoRA model in eval mode is ~50% off.

lora_lab therefore switches the repacking off on every ``Linear4bit`` it loads or trains
(:func:`keep_4bit_layout`): eval forwards then take the standard dequantize-and-matmul path, which
is exact and the same as in training.  :func:`unpack_4bit_weights` undoes a repacking that already
happened (a model evaluated before lora_lab saw it), with the scale layout fixed.

For reading weights without changing the model (``export_merged``): :func:`dense_weight` gives the
full-precision weight a 4-bit/int8/plain parameter stands for, packed layout included
(:func:`dequantize_packed_4bit`), and :func:`no_repacking` runs forwards with repacking off,
restoring each layer's setting afterwards.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ...errors import MergeError

__all__ = ["keep_4bit_layout", "unpack_4bit_weights", "no_repacking", "dense_weight",
           "dequantize_packed_4bit"]


def _linear4bit(model: nn.Module):
    return [m for m in model.modules() if type(m).__name__ == "Linear4bit"]


def keep_4bit_layout(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights in eval forwards; return how many layers."""
    layers = _linear4bit(model)
    for module in layers:
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return len(layers)


def unpack_4bit_weights(model: nn.Module) -> int:
    """Undo bitsandbytes' CPU repacking on every ``Linear4bit`` of ``model`` and keep it from
    happening again; return how many layers were unpacked."""
    n = 0
    for module in _linear4bit(model):
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
        weight = module.weight
        state = getattr(weight, "quant_state", None)
        if state is None or not getattr(state, "packing_format_for_cpu", False):
            continue
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

        nested = state.original_nested
        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
        if not nested:  # bitsandbytes 0.50 restores the nested scales only; put these back too
            state = weight.quant_state
            state.absmax = state.absmax.T.contiguous().reshape(-1).float()
        n += 1
    return n


def dequantize_packed_4bit(data: torch.Tensor, state) -> torch.Tensor:
    """The (N, K) weight of bitsandbytes' CPU-packed 4-bit layout, exactly as its kernel uses it.

    Packed layout: (N, K/2) bytes; each 64-byte row of ``data.reshape(-1, 32)`` holds, for 32
    output rows, two 4-bit codes each (low nibble: the even column, high nibble: the odd one) of one
    column pair.  The block scales are bf16, stored transposed: ``absmax`` (K/blocksize, N).
    """
    N, K = state.shape
    packed = data.reshape(-1, 32)
    codes = torch.cat([packed & 0xF, packed >> 4], dim=-1)            # (N·K/64, 64)
    codes = codes.reshape(N // 32, K // 2, 32, 2).transpose(1, 2).reshape(N, K)
    scale = state.absmax.float().T.repeat_interleave(state.blocksize, dim=1)  # (N, K)
    return state.code.float()[codes.long()] * scale


def dense_weight(module: nn.Module, p: torch.Tensor) -> torch.Tensor:
    """The full-precision weight a (possibly quantized) parameter stands for; never changes it."""
    kind = type(p).__name__
    if kind == "Params4bit":
        import bitsandbytes.functional as F

        state = p.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            return dequantize_packed_4bit(p.data, state)
        return F.dequantize_4bit(p.data, state).float()
    if kind == "Int8Params" and p.dtype == torch.int8:
        import bitsandbytes.functional as F

        scb = p.SCB if p.SCB is not None else getattr(module.state, "SCB", None)
        if scb is None:
            raise MergeError(f"The int8 weight of {type(module).__name__} has no row scales (SCB).",
                             "move the model to its device before exporting, or load it unquantized")
        return F.int8_vectorwise_dequant(p.data, scb).float()
    return p.detach()


@contextlib.contextmanager
def no_repacking(model: nn.Module):
    """Run forwards without bitsandbytes' CPU repacking of 4-bit weights (restored afterwards)."""
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    saved = [m.support_avx512bf16_for_cpu for m in layers]
    for m in layers:
        m.support_avx512bf16_for_cpu = False
    try:
        yield
    finally:
        for m, s in zip(layers, saved):
            m.support_avx512bf16_for_cpu = s
