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
"""

from __future__ import annotations

from torch import nn

__all__ = ["keep_4bit_layout", "unpack_4bit_weights"]


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
