"""``lora-lab demo``: the whole system without a notebook, run as a user runs it."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from lora_lab.cli import main


def test_demo_trains_raises_accuracy_and_writes_the_report(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "lora_lab.cli", "demo", "--steps", "100",
                           "--out", str(out)], capture_output=True, text=True, env=env,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    text = done.stdout
    before = float(re.search(r"accuracy before: (\d+)%", text).group(1))
    after = float(re.search(r"accuracy after:\s+(\d+)%", text).group(1))
    assert after > before, text
    steps = [int(s) for s in re.findall(r"step\s+(\d+)/100\s+loss", text)]
    assert steps[-1] == 100 and len(steps) >= 5                  # progress lines as it trains
    losses = [float(v) for v in re.findall(r"/100\s+loss\s+([\d.]+)", text)]
    assert losses[-1] < losses[0]
    report = out / "report.html"
    assert report.exists() and f"wrote {report}" in text
    html = report.read_text(encoding="utf-8")
    for sid in ("summary", "specs", "training", "spectra", "quantization", "memory"):
        assert f"<section id='{sid}'>" in html
    assert f"{after:.1f}%" in html and "<script src=" not in html
    adapters = list((out / "run").glob("checkpoint-*/adapter_config.json"))
    assert adapters, "the trained adapter is saved beside the report"


def test_demo_unknown_task_is_one_line_exit_2(tmp_path, capsys):
    assert main(["demo", "--task", "juggle", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "juggle" in err and "upper" in err and len(err.strip().splitlines()) == 1
