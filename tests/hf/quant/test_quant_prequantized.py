"""Weights already on a 4-bit grid (a GGUF Q4_1 checkpoint converted back to fp32) are flagged by
the scan, and every view that shows their error says so."""

from __future__ import annotations

import torch

from lora_lab.hf.quant import scan as hs
from lora_lab.viz.quant import error_heatmap, scheme_bars
from lora_lab.viz.report import report_html


def q4_1(w: torch.Tensor) -> torch.Tensor:
    """GGUF Q4_1 by hand: per block of 32, w ≈ d·q + m with q in 0…15, d and m in fp16."""
    blocks = w.reshape(-1, 32)
    lo, hi = blocks.min(1, keepdim=True).values, blocks.max(1, keepdim=True).values
    d = ((hi - lo) / 15).half().float()
    m = lo.half().float()
    q = torch.round((blocks - m) / d).clamp(0, 15)
    return (q * d + m).reshape(w.shape)


def state_dict(rounded: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    sd = {f"model.layers.{i}.self_attn.{m}.weight": 0.02 * torch.randn(64, 128, generator=g)
          for i in range(2) for m in ("q_proj", "v_proj")}
    return {k: q4_1(v) if rounded else v for k, v in sd.items()}


def test_q4_rounded_weights_are_flagged_everywhere_their_error_is_shown():
    scan = hs.scan_quantization(state_dict(True), schemes=("nf4", "fp4"), progress=False)
    assert (scan.table.levels_per_32 <= 16).all() and scan.prequantized
    assert "4-bit grid" in scan.note and "quantized_output_error" in scan.note
    assert "note: " in repr(scan) and "4-bit grid" in scan._repr_html_()
    for fig in (error_heatmap(scan), scheme_bars(scan)):
        assert "4-bit grid" in fig.layout.title.text
    assert all("4-bit grid" in b.args[1]["title.text"]
               for b in error_heatmap(scan).layout.updatemenus[0].buttons)
    assert "already rounded to a 4-bit grid" in report_html(quant=scan)


def test_ordinary_weights_carry_no_such_note():
    scan = hs.scan_quantization(state_dict(False), schemes=("nf4", "fp4"), progress=False)
    assert (scan.table.levels_per_32 == 32).all() and not scan.prequantized
    assert scan.note == "" and "note" not in repr(scan)
    assert error_heatmap(scan).layout.title.text == "relative error ‖W−Q‖/‖W‖ — nf4"
