"""bitsandbytes optimizers (CUDA only): 8-bit AdamW (Dettmers et al. 2022) and the paged variants
that QLoRA uses to survive memory spikes (QLoRA §3, "paged optimizers")."""

from __future__ import annotations


def bnb_optimizer(name: str, params, lr: float, weight_decay: float):
    """``adamw_8bit``, ``paged_adamw_8bit`` or ``paged_adamw`` from bitsandbytes."""
    import bitsandbytes as bnb

    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
           "paged_adamw": bnb.optim.PagedAdamW}[name]
    return cls(params, lr=lr, weight_decay=weight_decay)
