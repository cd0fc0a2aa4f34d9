"""The exported training script saves the Trainer's checkpoint every TrainSpec.autosave_minutes,
whatever its save strategy, and `--resume` continues from the newest one (fresh processes, CPU,
the builtin model), as lora_lab.train does."""

from __future__ import annotations

import re
import sys

import pytest
from test_export_script import _import, _run  # tests/export/, on sys.path under pytest

import lora_lab as ll
from lora_lab.export.script import export_script


@pytest.mark.slow
def test_the_exported_script_autosaves_and_resumes(tmp_path):
    train = ll.TrainSpec(steps=4, batch_size=8, lr=3e-3, autosave_minutes=1e-6)   # due at every step
    out = export_script(ll.AdapterSpec(r=4), None, train, path=tmp_path / "x")
    script = str(out.file("train.py"))
    _run([sys.executable, script], tmp_path)
    saved = sorted(int(p.name.split("-")[1]) for p in out.file("outputs").glob("checkpoint-*"))
    assert saved == [1, 2, 3, 4]   # save_every is None: the timed saves alone
    log = _run([sys.executable, script, "--resume", "--steps", "6"], tmp_path)
    assert re.findall(r"^step (\d+)/6  loss", log, re.M) == ["5", "6"], log   # from checkpoint-4 on
    assert (out.file("outputs") / "adapter" / "adapter_model.safetensors").exists()


def test_the_script_autosaves_by_the_spec(tmp_path):
    """The exported script's callbacks: Autosave every TrainSpec.autosave_minutes (10 by default),
    none when it is None."""
    for minutes, want in ((10.0, 600.0), (None, None)):
        out = export_script(ll.AdapterSpec(r=4), None, ll.TrainSpec(steps=2, autosave_minutes=minutes),
                            path=tmp_path / str(minutes))
        script = _import(out.file("train.py"), f"exported_{'on' if minutes else 'off'}")
        found = {type(c).__name__: c for c in script.callbacks("cpu", tmp_path)}
        assert "MetricsLogger" in found
        assert (found["Autosave"].every_s if "Autosave" in found else None) == want


@pytest.mark.slow
def test_the_trl_script_resumes_too(tmp_path):
    """train_trl.py shares the Trainer script's callbacks and --resume (launch.RUN): TRL's SFTTrainer
    keeps the timed checkpoints and continues from the newest."""
    train = ll.TrainSpec(steps=3, batch_size=8, lr=3e-3, autosave_minutes=1e-6)   # due at every step
    out = export_script(ll.AdapterSpec(r=4), None, train, path=tmp_path / "x", trl=True)
    script = str(out.file("train_trl.py"))
    _run([sys.executable, script], tmp_path)
    saved = sorted(int(p.name.split("-")[1]) for p in out.file("outputs").glob("checkpoint-*"))
    assert saved == [1, 2, 3]
    log = _run([sys.executable, script, "--resume", "--steps", "5"], tmp_path)
    assert re.findall(r"^step (\d+)/5  loss", log, re.M) == ["4", "5"], log   # from checkpoint-3 on
    assert (out.file("outputs") / "adapter" / "adapter_model.safetensors").exists()
