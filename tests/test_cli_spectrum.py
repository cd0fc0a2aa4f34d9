"""``lora-lab spectrum``: a saved adapter's table printed as the in-memory analysis gives it, and an
HTML report that carries plotly.js and its figures (so it opens offline)."""

from __future__ import annotations

import pytest

import lora_lab as ll
from lora_testing import randomize_lora_b
from lora_lab.cli import main


@pytest.fixture
def saved_adapter(tiny_llama, tmp_path):
    model = ll.attach(tiny_llama[0], ll.AdapterSpec(r=4, target_modules="attention-qv"))
    randomize_lora_b(model, seed=0, scale=0.05)
    path = ll.save_adapter(model, tmp_path / "adapter")
    return path, ll.adapter_spectra(model)


def test_spectrum_prints_table_and_summary(saved_adapter, capsys):
    path, spectra = saved_adapter
    assert main(["spectrum", str(path)]) == 0
    out = capsys.readouterr().out
    assert spectra.table.to_string(index=False) in out       # the same numbers as in memory
    assert "effective rank  min" in out and "cutting every ΔW to rank k" in out
    energy_r2 = sum(float((s.values[:2] ** 2).sum()) for s in spectra.spectra.values()) / \
        sum(s.frobenius ** 2 for s in spectra.spectra.values())
    cut_rows = out.split("cutting every ΔW to rank k")[1].splitlines()
    row2 = next(line.split() for line in cut_rows if line.split()[:1] == ["2"])
    assert float(row2[2]) == pytest.approx(energy_r2, rel=1e-3)
    assert int(row2[1]) == spectra.parameters_at(2)


def test_spectrum_html_report_is_self_contained(saved_adapter, tmp_path, capsys):
    path, spectra = saved_adapter
    out = tmp_path / "report" / "spectrum.html"
    assert main(["spectrum", str(path), "--html", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert text.count("Plotly.newPlot(") == 4                 # 3 heatmaps + 1 spectrum
    assert "<script src=" not in text                          # nothing to download
    assert out.stat().st_size > 2**20                            # plotly.js is in the file
    assert all(name in text for name in spectra.table["name"])
    assert "wrote" in capsys.readouterr().out


def test_spectrum_errors_without_traceback(tmp_path, capsys):
    assert main(["spectrum", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no adapter_config.json" in err and "Traceback" not in err


def test_spectrum_of_a_dora_adapter_says_what_it_shows(tiny_llama, tmp_path, capsys):
    model = ll.attach(tiny_llama[0], ll.AdapterSpec(r=4, target_modules="attention-qv", use_dora=True))
    randomize_lora_b(model, seed=0, scale=0.05)
    path = ll.save_adapter(model, tmp_path / "dora")
    notes = ll.adapter_spectra(model).notes
    assert notes and all("DoRA" in n for n in notes)
    assert main(["spectrum", str(path)]) == 0
    out = capsys.readouterr().out
    assert any(line.startswith("note") and "DoRA" in line for line in out.splitlines()), out[:2000]
