"""Scheme names, module order and the 4-bit-grid detector of ``lora_lab.core.quant``."""

from __future__ import annotations

import pytest
import torch

from lora_lab.core import quant as cq
from lora_lab.errors import LoraLabError


def test_scheme_names_tell_llm_int8_from_blockwise_int8():
    assert cq.SCHEMES == ("nf4", "fp4", "int8", "int8-blockwise", "int4")
    assert cq.canonical_scheme("llm.int8") == "int8" == cq.canonical_scheme("int8")
    assert "load_model(quant='int8')" in cq.SCHEME_NOTES["int8"]
    assert "optimizers" in cq.SCHEME_NOTES["int8-blockwise"]
    with pytest.raises(LoraLabError, match="int8-blockwise"):
        cq.canonical_scheme("int9")


def test_llm_int8_bits_are_one_fp32_per_row_without_double_quant():
    # a 4096-wide row: 8 bits + 32/4096 for its absmax (core/memory.int8_bytes counts the same)
    assert cq.bits_per_param("int8", 4096) == pytest.approx(8 + 32 / 4096)
    assert cq.bits_per_param("int8", 4096, double_quant=True) == cq.bits_per_param("int8", 4096)
    assert cq.bits_per_param("int8-blockwise", 64, True) < cq.bits_per_param("int8-blockwise", 64)


def test_module_order_is_the_order_models_list_them():
    alphabetical = ["down_proj", "gate_proj", "up_proj", "k_proj", "o_proj", "q_proj", "v_proj"]
    assert cq.module_order(alphabetical) == list(cq.MODULE_ORDER)
    assert cq.module_order(["fc2", "v_proj", "fc1", "q_proj", "v_proj"]) == \
        ["q_proj", "v_proj", "fc2", "fc1"]


def test_levels_per_block_counts_distinct_values():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g)
    assert cq.levels_per_block(w) == 32.0
    grid = torch.round(w * 2).clamp(-4, 3) / 2          # at most 8 values anywhere
    assert cq.levels_per_block(grid) <= 8
    assert cq.levels_per_block(torch.ones(10)) == 1.0   # shorter than a block
    big = torch.randn(1000, 1000, generator=g)          # 31,250 blocks: 1,024 of them sampled
    assert cq.levels_per_block(big) == 32.0
