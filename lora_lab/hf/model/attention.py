"""Attention in fp32 while training under bf16 autocast on a CPU.

PyTorch's CPU flash attention (what transformers' ``"sdpa"`` attention runs on a CPU) is slower
in bf16 than in fp32: for one SmolLM2 layer's shapes (8 rows × 64 tokens, 9 query heads over 3
key/value heads of 64), forward and backward take 7.2 ms in bf16 and 3.4 ms in fp32 (best of 10,
2 cores with AVX512-BF16; the bf16 kernel converts inside its inner loop).  Under bf16 autocast
the matrix products of the projections stay bf16, where the chip is 2.3× faster, and only the
attention itself runs in fp32: queries, keys and values are upcast, the softmax and weighted sum
are exact to fp32, and the output is rounded back to bf16, which is what the bf16 kernel returns.
So it is faster and at least as exact.  Measured in training (``benchmarks/cpu_speed.py``): see
the README's CPU section.

:class:`Fp32Attention` switches a model that uses ``"sdpa"`` to this attention
(``set_attn_implementation``, transformers' own switch, with transformers' sdpa masks) for the
duration of a ``with`` block, and back after; elsewhere (a GPU, fp32, fp16, another attention
implementation) it does nothing.  ``lora_lab.train`` uses it around the run.
"""

from __future__ import annotations

import torch

from .._peft import base_of

__all__ = ["NAME", "sdpa_fp32", "Fp32Attention"]

NAME = "lora_lab_sdpa_fp32"
_registered = False


def sdpa_fp32(module, query, key, value, attention_mask, **kwargs):
    """transformers' sdpa attention with autocast off and q, k, v (and a float mask) in fp32.

    Shapes as transformers passes them: ``query`` (B, H, T, D), ``key``/``value`` (B, H_kv, S, D);
    returns ``(output (B, T, H, D) in query's dtype, None)``.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    with torch.autocast(query.device.type, enabled=False):
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.float()
        bias = kwargs.get("position_bias")
        if bias is not None and bias.is_floating_point():  # added to the mask: fp32 like the queries
            kwargs["position_bias"] = bias.float()
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(),
                                              attention_mask, **kwargs)
    return out.to(query.dtype), weights


def _register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

        AttentionInterface.register(NAME, sdpa_fp32)
        AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])  # sdpa's masks
        _registered = True


class Fp32Attention:
    """``with Fp32Attention(model, device_type, dtype):`` attention in fp32 inside the block when
    the model trains on a CPU under bf16 autocast (``dtype is torch.bfloat16``) with ``"sdpa"``
    attention; a no-op otherwise.  ``active`` says which."""

    def __init__(self, model, device_type: str, dtype):
        base = base_of(model)
        config = getattr(base, "config", None)
        self.base = base
        self.active = (device_type == "cpu" and dtype == torch.bfloat16
                       and getattr(config, "_attn_implementation", None) == "sdpa"
                       and hasattr(base, "set_attn_implementation"))

    def __enter__(self) -> "Fp32Attention":
        # {"": name} switches this config only: sub-configs (a vision tower's) keep their own
        if self.active:
            try:
                _register()
                self.base.set_attn_implementation({"": NAME})
            except Exception:  # noqa: BLE001  (a speed choice never stops a run: keep "sdpa")
                self.base.config._attn_implementation_internal = "sdpa"
            self.active = self.base.config._attn_implementation == NAME  # a model that refused stays
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            self.base.set_attn_implementation({"": "sdpa"})
