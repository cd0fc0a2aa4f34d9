"""The quantization and spectrum pages agree on order: layers as numbers (2 before 10), module types
as models list them (q, k, v, o, gate, up, down), and a 30-layer heatmap writes no unreadable
numbers in its cells."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from lora_lab.hf.quant.scan import scan_quantization
from lora_lab.hf.spectra.analysis import spectra_from_factors
from lora_lab.viz.quant import error_heatmap
from lora_lab.viz.report import report_html
from lora_lab.viz.spectrum import spectrum_heatmap

MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
          "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def name(layer: int, module: str) -> str:
    return f"model.layers.{layer}.{PARENT[module]}.{module}"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """12 layers × 7 modules; safetensors stores the keys alphabetically (layer 10 before 2)."""
    g = torch.Generator().manual_seed(0)
    sd = {name(i, m) + ".weight": torch.randn(8, 32, generator=g)
          for i in range(12) for m in MODULE_ORDER}
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_file(sd, path)
    return path


def spectra(layers: int):
    g = torch.Generator().manual_seed(1)
    factors = [SimpleNamespace(name=name(i, m), B=torch.randn(16, 4, generator=g),
                               A=torch.randn(4, 32, generator=g), scaling=2.0)
               for i in range(layers) for m in sorted(MODULE_ORDER)]   # alphabetical on purpose
    return spectra_from_factors(factors, "demo")


def test_scan_of_a_checkpoint_lists_layers_numerically_in_model_order(checkpoint):
    t = scan_quantization(checkpoint, schemes=("nf4",), progress=False).table
    assert list(t.layer) == [i for i in range(12) for _ in MODULE_ORDER]
    assert list(t.module) == list(MODULE_ORDER) * 12
    html = report_html(quant=scan_quantization(checkpoint, schemes=("nf4",), progress=False))
    rows = html[html.index("<details>"):]
    assert rows.index(name(2, "q_proj")) < rows.index(name(10, "q_proj"))
    assert rows.index(name(2, "q_proj")) < rows.index(name(2, "down_proj"))


def test_quant_and_spectrum_heatmaps_share_one_order(checkpoint):
    quant = error_heatmap(scan_quantization(checkpoint, schemes=("nf4",), progress=False)).data[0]
    spec = spectrum_heatmap(spectra(12), "effective_rank").data[0]
    assert list(quant.x) == list(spec.x) == list(MODULE_ORDER)
    assert list(quant.y) == [int(y) for y in spec.y] == list(range(12))


def test_many_cells_keep_their_numbers_in_hover_only():
    big = spectrum_heatmap(spectra(30), "effective_rank").data[0]
    assert big.text is None and big.texttemplate is None
    assert "%{z" in big.hovertemplate
    small = spectrum_heatmap(spectra(3), "effective_rank").data[0]
    assert small.texttemplate == "%{text}" and len(small.text) == 3
    def body(layers):                                 # the figures, after the inlined plotly.js
        page = report_html(spectra=spectra(layers))
        return page[page.index("<body>"):]

    assert '"texttemplate":"%{text}"' in body(3) and '"texttemplate"' not in body(30)
