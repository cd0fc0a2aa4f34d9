"""AdapterDesigner (issue 23, item 3): beside the full FT vs LoRA vs QLoRA verdicts it says, in
words, what each assumes, and that changes with the device (fp32 master weights on a T4, pure bf16
on a bf16 GPU, fp32 on the CPU)."""

import pytest

from lora_lab.ui.designer import AdapterDesigner


@pytest.fixture
def designer(tiny_llama_dir):
    return AdapterDesigner(str(tiny_llama_dir))


def test_the_summary_names_each_scenarios_recipe_and_follows_the_device(designer):
    d = designer
    summary = d.summary.value
    assert d.device.value == "T4" and "Assumed" in summary
    assert "full FT: fp32 master weights + fp16 autocast + loss scaling" in summary
    assert "16 B/param" in summary and "GradScaler refuses fp16 gradients" in summary
    assert "LoRA and QLoRA: fp32 adapters" in summary and "16 B per adapter param" in summary
    assert summary.index("Assumed") > summary.index("full FT: ")  # right under the verdicts
    d.device.value = "A100-80GB"
    assert "full FT: pure bf16" in d.summary.value and "2 + 2 + 4 = 8 B/param" in d.summary.value
    d.device.value = "cpu"
    assert "full FT: fp32 weights, gradients and AdamW" in d.summary.value
    d.method.value = "QLoRA"
    assert "QLoRA: fp32 adapters" in d.summary.value


def test_the_t4_full_ft_bar_holds_16_bytes_per_param(designer):
    d = designer
    est = d.estimate
    full = est.scenarios["full FT"]
    assert full["base_weights"] + full["gradients_total"] + full["optimizer_states"] == \
        16 * est.total_params
    bars = {t.name: list(t.y) for t in d.live.figure.data}
    assert bars["base weights"][0] == pytest.approx(4 * est.total_params / 2**30)
