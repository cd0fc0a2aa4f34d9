"""Helpers shared by the tests (importable because pytest puts tests/ on the path)."""

from __future__ import annotations

import torch


def randomize_lora_b(model, seed: int = 0, scale: float = 0.05):
    """Give every ``lora_B`` random N(0, scale²) entries, drawn in parameter order from a generator
    seeded with ``seed``: peft starts B at zero (ΔW = 0), so an untrained adapter has no update to
    test.  Returns the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model
