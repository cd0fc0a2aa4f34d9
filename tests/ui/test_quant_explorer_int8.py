"""QuantExplorer names LLM.int8() (what load_model(quant="int8") stores) apart from bitsandbytes'
blockwise int8, and greys out the settings LLM.int8() does not have."""

from __future__ import annotations

import numpy as np
import pytest

import lora_lab as ll
from lora_lab.hf.quant.roundtrip import quant_error
from lora_lab.ui.quant_explorer import QuantExplorer


@pytest.fixture(scope="module")
def tiny():
    return ll.load_model("builtin:tiny")[0]


def test_int8_is_llm_int8_and_blockwise_is_its_own_choice(tiny):
    e = QuantExplorer(tiny)
    assert {"int8", "int8-blockwise"} <= set(e.scheme.options)
    assert not e.blocksize.disabled and not e.double_quant.disabled
    e.scheme.value = "int8"
    assert e.blocksize.disabled and e.double_quant.disabled
    assert "LLM.int8()" in e.summary.value and "load_model(quant=&#x27;int8&#x27;)" in e.summary.value
    assert "one absmax per row" in e.summary.value
    W = dict(tiny.named_parameters())
    for row in e.result.table.itertuples():                  # row-wise, as Int8Params stores it
        assert row.rel_error == pytest.approx(quant_error(W[row.name], "int8").rel_error)
        assert row.blocksize == row.in_features
    llm = np.array(e.heatmap.figure.data[0].z, dtype=float)
    e.blocksize.value = 256                                  # no effect on LLM.int8(): same scan
    first = e.result
    e.double_quant.value = True
    assert e.result is first
    e.scheme.value = "int8-blockwise"
    assert not e.blocksize.disabled and "optimizers" in e.summary.value
    assert not np.allclose(np.array(e.heatmap.figure.data[0].z, dtype=float), llm)


def test_llm_int8_name_is_accepted(tiny):
    e = QuantExplorer(tiny, scheme="llm.int8")
    assert e.scheme.value == "int8" and e.result.schemes == ("int8",) and not e.error
