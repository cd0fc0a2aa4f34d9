"""Every capability on the real model, builtin:smollm2 (issue 16): peft round trips, merged exports,
spectra, the quantization scan and every widget.  Oracles: plain peft / transformers loading the
files lora_lab wrote, torch.linalg.svdvals of the dense ΔW, bitsandbytes' own round trip.

The adapters here are attached with random B (see lora_testing.randomize_lora_b), so they change the
outputs without a training run; training on this model is tested by tests/test_notebook_07.py.
"""

from __future__ import annotations

import pytest
import torch

import lora_lab as ll
from lora_lab.hf.data.prepare import encode_prompt
from lora_testing import randomize_lora_b

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lora_smol(smollm2_dir):
    model, tok = ll.load_model("builtin:smollm2", device="cpu")
    torch.manual_seed(0)
    model = ll.attach(model, ll.AdapterSpec(r=8, alpha=16, target_modules="all-linear"), name="json")
    randomize_lora_b(model, scale=0.02)
    ids = torch.tensor([encode_prompt(tok, "Name a colour.")])  # the ChatML prompt training uses
    return model, tok, ids


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_saved_adapter_loads_in_plain_peft_with_the_same_logits(lora_smol, tmp_path, smollm2_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, _, ids = lora_smol
    ours = _logits(model, ids)
    with ll.disabled_adapters(model):
        base = _logits(model, ids)
    assert (ours - base).abs().max() > 1e-2  # the adapter does change the outputs
    folder = ll.save_adapter(model, tmp_path / "json")
    plain = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    theirs = _logits(PeftModel.from_pretrained(plain, folder), ids)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


def test_merged_export_reloads_in_plain_transformers_with_the_same_logits(lora_smol, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok, ids = lora_smol
    ours = _logits(model, ids)
    report = ll.export_merged(model, tmp_path / "merged", dtype=torch.float32, tokenizer=tok)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert not hasattr(plain, "peft_config")
    theirs = _logits(plain, ids)
    rel = float((theirs - ours).norm() / ours.norm())
    assert rel < 1e-5, rel
    assert report is not None
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").eos_token == "<|im_end|>"


def test_spectra_equal_the_dense_svd_on_every_layer_type(lora_smol):
    model, _, _ = lora_smol
    spectra = ll.adapter_spectra(model)
    assert len(spectra.table) == 210
    layer = model.base_model.model.model.layers[17]
    for name, module in (("self_attn.q_proj", layer.self_attn.q_proj),
                         ("self_attn.k_proj", layer.self_attn.k_proj), ("mlp.down_proj", layer.mlp.down_proj)):
        A, B = module.lora_A["json"].weight.double(), module.lora_B["json"].weight.double()
        oracle = torch.linalg.svdvals(module.scaling["json"] * B @ A)[:8]
        key = next(k for k in spectra.spectra if k.endswith(f"layers.17.{name}"))
        got = torch.as_tensor(spectra.spectra[key].values, dtype=torch.float64)
        torch.testing.assert_close(got[:8], oracle, rtol=1e-6, atol=1e-9)


def test_quantization_scan_covers_every_layer_and_matches_bitsandbytes(smollm2_dir):
    import bitsandbytes.functional as F
    from safetensors import safe_open

    scan = ll.scan_quantization(smollm2_dir, schemes=("nf4",), progress=False)
    table = scan.table
    assert len(table) == 210
    name = "model.layers.5.mlp.up_proj.weight"
    with safe_open(smollm2_dir / "model.safetensors", "pt") as f:
        w = f.get_tensor(name).float()
    q, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    ref = float((F.dequantize_4bit(q, state).float() - w).norm() / w.norm())
    got = float(table.loc[table["name"] == name, "rel_error"].iloc[0])
    assert got == pytest.approx(ref, rel=1e-4)


def test_every_widget_builds_on_it(lora_smol, smollm2_dir):
    from lora_lab.ui import AdapterDesigner, AdapterSwitchboard, QuantExplorer, RankExplorer, TrainingDashboard

    model, tok, _ = lora_smol
    designer = AdapterDesigner(str(smollm2_dir), static=True)
    assert designer.error == "" and designer.estimate is not None
    explorer = RankExplorer(model, static=True)
    assert len(explorer.spectra.table) == 210
    quant = QuantExplorer(str(smollm2_dir), static=True)
    assert quant.error == "" and len(quant.result.table) == 210
    board = AdapterSwitchboard(model, tok, background=False)
    assert board.error == ""
    TrainingDashboard()
