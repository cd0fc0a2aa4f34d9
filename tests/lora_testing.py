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


IDS = torch.randint(4, 90, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS):
    """fp32 logits of ``model`` on ``ids`` (default: two fixed random rows of 12 tokens), eval mode."""
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def randomize_lora(model, adapter, seed=0):
    """Give adapter ``adapter``'s B non-zero N(0, 0.05²) values, so it changes outputs (peft starts
    B at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f"lora_B.{adapter}." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def allocated_peak(step) -> int:
    """Peak of the bytes torch allocates during one call of ``step`` over what existed before it,
    from the profiler's allocation events in time order.  ``step`` runs once first, unprofiled, so
    what persists from the first call (AdamW's moments, caches) is not counted."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    live = peak = 0
    for e in sorted((e for e in prof.profiler.kineto_results.events() if e.nbytes() != 0),
                    key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak
