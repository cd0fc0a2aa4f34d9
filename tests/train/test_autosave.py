"""TrainSpec.autosave_minutes: a run killed from outside (SIGKILL, as the out-of-memory killer or a
closed Colab does; no handler runs) keeps what was trained up to its last timed checkpoint, and
train(..., resume_from=...) continues from there."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import lora_lab as ll
from lora_lab.train.events import Autosave, Control, TrainState

CHILD = r"""
import sys, lora_lab as ll
sys.path.insert(0, sys.argv[3])
from conftest import attach_lora, token_rows
model, tok = ll.load_model(sys.argv[1], device="cpu")
model = attach_lora(model)
ll.train(model, tok, token_rows(tok), spec=ll.TrainSpec(
    steps=100000, batch_size=4, lr=1e-2, schedule="constant", autosave_minutes=0.005,
    output_dir=sys.argv[2]))
"""


def _latest_step(run: Path) -> int:
    try:
        return int((run / "latest").read_text().rsplit("-", 1)[1])
    except (OSError, IndexError, ValueError):
        return 0


def test_a_killed_run_keeps_its_timed_checkpoint_and_resumes(tiny_llama_dir, tmp_path):
    run = tmp_path / "run"
    tests_train = str(Path(__file__).parent)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tiny_llama_dir), str(run), tests_train],
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while _latest_step(run) < 3 and child.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert child.poll() is None, child.stderr.read().decode()[-2000:]
        assert _latest_step(run) >= 3, "no timed checkpoint within 120 s"
    finally:
        child.send_signal(signal.SIGKILL)  # no handler runs: what is on disk is all that is left
        child.wait()
    step = _latest_step(run)
    ckpt = run / (run / "latest").read_text()
    saved = load_file(ckpt / "adapter_model.safetensors")
    assert saved and all(torch.isfinite(t).all() for t in saved.values())
    assert any(float(t.abs().sum()) > 0 for k, t in saved.items() if "lora_B" in k)  # trained: B left 0

    from conftest import attach_lora, token_rows  # noqa: E402  (tests/train/conftest.py)

    model, tok = ll.load_model(tiny_llama_dir, device="cpu")
    model = attach_lora(model)
    res = ll.train(model, tok, token_rows(tok), spec=ll.TrainSpec(
        steps=step + 2, batch_size=4, lr=1e-2, schedule="constant", autosave_minutes=None,
        output_dir=str(tmp_path / "resumed")), resume_from=ckpt)
    assert res.steps == step + 2 and [r["step"] for r in res.rows][-3:] == [step, step + 1, step + 2]


def test_autosave_asks_for_a_save_once_its_minutes_have_passed(monkeypatch):
    """The callback's clock: no request before the interval, one after, and a save restarts it."""
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    cb, control, state = Autosave(10), Control(), TrainState(event="step", step=1, max_steps=9)
    cb.on_begin(state, control)
    now[0] += 599
    cb.on_step(state, control)
    assert not control.take_save_request()
    now[0] += 1
    cb.on_step(state, control)
    assert control.take_save_request()
    cb.on_save(state, control)
    now[0] += 300
    cb.on_step(state, control)
    assert not control.take_save_request()
