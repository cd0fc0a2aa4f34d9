"""Keep 4-bit layers trainable after an evaluation on CPU.

bitsandbytes 0.50's ``Linear4bit.forward`` repacks its weight into a CPU-friendly layout the first
time it runs in eval mode on an input that needs no gradient, on CPUs with AVX512-BF16.  It never
unpacks it when training resumes, and the packed path (``gemv_4bit``) has no autograd kernel: from
then on the gradient to the layer's *input* is silently dropped, so every LoRA factor below the last
4-bit layer stops learning.  Any evaluation, ``task_accuracy`` or generation before or during QLoRA
training triggers it.  :func:`unpack_4bit_weights` puts the weights back in the standard layout
(the same call bitsandbytes makes before saving a state dict); the training loop calls it before
training and after every evaluation, and :class:`~lora_lab.LiveCallback` when a Trainer starts and after each of its evaluations.
"""

from __future__ import annotations

from torch import nn

__all__ = ["unpack_4bit_weights"]


def unpack_4bit_weights(model: nn.Module) -> int:
    """Undo bitsandbytes' CPU repacking on every ``Linear4bit`` of ``model``; return how many."""
    n = 0
    for module in model.modules():
        if type(module).__name__ != "Linear4bit":
            continue
        weight = module.weight
        state = getattr(weight, "quant_state", None)
        if state is None or not getattr(state, "packing_format_for_cpu", False):
            continue
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
        n += 1
    return n
