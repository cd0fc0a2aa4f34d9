"""07_real_model runs headless on builtin:smollm2 and teaches the real model a reply format.

This is also the test that a short LoRA and a short QLoRA run on the real model teach held-out
prompts a format the base model never uses (issue 16).  Oracles: the base model's own answers (0/15
in the format), the format checked by json.loads, and the trainable count from the config's shapes
(Σ r·(in + out) over the 210 linear layers).  CI runs fewer steps than the notebook's default.
"""

import pytest
from notebook_runner import run_notebook

from lora_lab.hf.model import device as dev

STEPS = 24


@pytest.mark.slow
def test_real_model_notebook_teaches_a_format_with_lora_and_qlora(tmp_path, smollm2_dir, monkeypatch):
    monkeypatch.setenv("LORA_LAB_CACHE", str(smollm2_dir.parent.parent))  # the kernel reads the same cache
    values, nb = run_notebook("07_real_model.ipynb", {"STEPS": STEPS, "COMPARE_QLORA": True}, cwd=tmp_path,
                              timeout=1500,
                              probe=("format_before", "format_after", "exact_after", "rows", "trainable",
                                     "precision", "dtype"))
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    h, i, kv, layers, r = 576, 1536, 192, 30, 8
    assert values["trainable"] == r * layers * (2 * (h + h) + 2 * (h + kv) + 2 * (h + i) + (i + h))
    # the library's rule decides (hf/model/device.py): bf16 weights and autocast on a CPU with native
    # bf16 (half the memory, ~1.8x faster), fp32 on a CPU that would emulate bf16 (30-350x slower)
    assert (values["dtype"], values["precision"]) == ("auto", "auto")
    assert values["format_before"] == 0.0
    lora, qlora = values["rows"]
    native = dev.cpu_prefers_bf16(h)
    assert lora["method"] == ("LoRA (bfloat16 base)" if native else "LoRA (float32 base)"), lora
    assert lora["precision"] == qlora["precision"] == ("bf16 autocast" if native else "fp32"), (lora, qlora)
    assert lora["JSON format (held out)"] >= 0.6, lora
    assert qlora["method"] == "QLoRA (NF4 base)" and qlora["JSON format (held out)"] >= 0.6, qlora
    for row in (lora, qlora):
        assert row["tokens/s"] > 0 and row["memory MB"] > 0 and row["final loss"] < 1.0, row
    assert (tmp_path / "adapters" / "smollm2-json" / "adapter_model.safetensors").exists()
