"""The Export buttons of the AdapterDesigner and the TrainingDashboard write the export, or show the
LoraLabError with its fix inline."""

from __future__ import annotations

import ast

import lora_lab as ll
from lora_lab.ui.dashboard import TrainingDashboard
from lora_lab.ui.designer import AdapterDesigner


def _settings(path):
    """The literal settings block of an exported train.py, as a dict of name -> value."""
    tree = ast.parse(path.read_text())
    return {n.targets[0].id: ast.literal_eval(n.value) for n in tree.body
            if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name)
            and n.targets[0].id in ("QUANT", "TRAIN", "FORMAT", "ADAPTER_SPEC")}


def test_designer_export_button_writes_the_current_choice(tmp_path):
    d = AdapterDesigner("builtin:tiny")
    with d.hold():
        d.method.value = "QLoRA"
        d.r.value = 4
        d.batch.value = 3
        d.seq_len.value = 64
    panel = d.export_panel
    panel.folder.value = str(tmp_path / "designer")
    panel.button.click()
    out = panel.exported
    assert out is not None and "accelerate launch" in panel.result.value
    s = _settings(out.file("train.py"))
    assert s["ADAPTER_SPEC"]["r"] == 4 and s["QUANT"]["quant_type"] == "nf4"
    assert s["TRAIN"]["batch_size"] == 3 and s["FORMAT"]["max_length"] == 64
    assert (tmp_path / "designer" / "accelerate" / "fsdp_qlora.yaml").exists()


def test_designer_export_shows_errors_inline(tmp_path):
    d = AdapterDesigner("builtin:tiny")
    d.r.value = 0                                      # an invalid choice
    d.export_panel.folder.value = str(tmp_path / "x")
    d.export_panel.button.click()
    assert d.export_panel.exported is None and "Fix:" in d.export_panel.result.value
    d.r.value = 8
    afile = tmp_path / "file"
    afile.write_text("")
    d.export_panel.folder.value = str(afile)           # a file, not a folder
    d.export_panel.button.click()
    assert "is a file" in d.export_panel.result.value and "Traceback" not in d.export_panel.result.value


def test_dashboard_export_button(tmp_path):
    dash = TrainingDashboard()
    dash.export_panel.folder.value = str(tmp_path / "dash")
    dash.export_panel.button.click()                   # nothing to export yet: says how
    assert dash.export_panel.exported is None and "set_export" in dash.export_panel.result.value
    spec, train = ll.AdapterSpec(r=2, target_modules="attention-qv"), ll.TrainSpec(steps=7)
    rows = [{"prompt": f"next {i}", "response": str(i + 1)} for i in range(10)]
    dash.set_export(adapter_spec=spec, train_spec=train, data=rows)
    dash.export_panel.button.click()
    out = dash.export_panel.exported
    s = _settings(out.file("train.py"))
    assert s["TRAIN"]["steps"] == 7 and s["ADAPTER_SPEC"]["target_modules"] == ["q_proj", "v_proj"]
    assert len(out.file("data/train.jsonl").read_text().splitlines()) == 9
    designer = AdapterDesigner("builtin:tiny")
    dash.set_export(designer)                          # or follow a designer's choice
    designer.r.value = 16
    dash.export_panel.button.click()
    assert _settings(dash.export_panel.exported.file("train.py"))["ADAPTER_SPEC"]["r"] == 16
