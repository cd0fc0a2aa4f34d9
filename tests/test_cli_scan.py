"""``lora-lab scan``: the per-layer table and summary of a checkpoint, as the in-memory scan gives
them, a self-contained HTML report, and one-line errors with exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import lora_lab as ll
from lora_lab.cli import main
from lora_lab.hf.model.builtin import resolve_builtin


@pytest.fixture(scope="module")
def tiny_scan():
    return ll.scan_quantization(resolve_builtin("builtin:tiny"), progress=False)


def test_scan_prints_every_linear_layer_and_the_summary(tiny_scan):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "lora_lab.cli", "scan", "builtin:tiny"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    names = set(tiny_scan.table["name"])
    assert len(names) == 28                                   # 4 layers × 7 linear modules
    for name in names:                                        # one row per scheme
        rows = [line.split() for line in lines if line.split()[:1] == [name]]
        assert sorted(r[6] for r in rows) == ["fp4", "int8", "nf4"]
    summary = done.stdout.split("per scheme")[1].splitlines()
    t = tiny_scan.table
    for scheme in ("nf4", "fp4", "int8"):
        g = t[t.scheme == scheme]
        row = next(line.split() for line in summary if line.split()[:1] == [scheme])
        assert float(row[3]) == pytest.approx(g["rel_error"].mean(), rel=1e-3)
        assert float(row[4]) == pytest.approx(g["rel_error"].max(), rel=1e-3)
        fp16_mb = 2 * g["numel"].sum() / 2**20
        size_mb = (g["numel"] * g["bits_per_param"]).sum() / 8 / 2**20
        assert float(row[6]) == pytest.approx(fp16_mb, rel=1e-3)
        assert float(row[7]) == pytest.approx(size_mb, rel=1e-3)
        assert float(row[9]) == pytest.approx(100 * (1 - size_mb / fp16_mb), rel=1e-3)


def test_scan_html_report_is_self_contained(tiny_scan, tmp_path, capsys):
    out = tmp_path / "report" / "scan.html"
    assert main(["scan", "builtin:tiny", "--schemes", "nf4,fp4", "--html", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert text.count("Plotly.newPlot(") == 2                 # heatmap + scheme bars
    assert "<script src=" not in text                          # nothing to download
    assert out.stat().st_size > 2**20                            # plotly.js is in the file
    assert all(name in text for name in tiny_scan.table["name"])
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("args, words", [
    (["MISSING"], "does not exist"),
    (["builtin:tiny", "--schemes", "nf5"], "nf5"),
    (["builtin:tiny", "--blocksize", "100"], "blocksize=100"),
])
def test_scan_errors_exit_2_with_one_line(args, words, tmp_path, capsys):
    args = [str(tmp_path / "missing") if a == "MISSING" else a for a in args]
    assert main(["scan", *args]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
