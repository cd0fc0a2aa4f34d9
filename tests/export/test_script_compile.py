"""The exported training script honours TrainSpec(compile=True) as lora_lab.train does: each decoder
layer through torch.compile.  Before, the script wrote TRAIN["compile"] and ran eagerly.

Oracle: the same script with compile=False (PyTorch's eager kernels), in fresh processes on the CPU.
In fp32 the compiled run gives the same per-step losses (1e-4 relative, as tests/train/test_compile.py
allows for inductor's code), and it reports the graphs dynamo captured, so a silent fall back to
eager fails the test.
"""

from __future__ import annotations

import json
import sys

import pytest
from test_export_script import _import, _run  # tests/export/, on sys.path under pytest

import lora_lab as ll
from lora_lab.export.script import export_script
from lora_lab.hf.training.compile import compiler_missing

SPEC = ll.TrainSpec(steps=3, batch_size=4, lr=3e-3, seed=0, precision="fp32", eval_every=None,
                    autosave_minutes=None)


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in out.file("outputs/metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.skipif(compiler_missing("cpu") is not None, reason="torch.compile on a CPU needs a C++ compiler")
def test_the_script_compiles_the_decoder_layers_and_trains_as_eager(tmp_path):
    """Under activation checkpointing, the harder case (dynamo traces the recompute too; without the
    script's config patch the layers ran eagerly: 0 graphs, measured).  Without checkpointing it was
    measured equal to eager as well."""
    logs, losses = {}, {}
    for compiled in (False, True):
        train = SPEC.replace(compile=compiled, gradient_checkpointing=True)
        out = export_script(ll.AdapterSpec(r=4, dropout=0.0), None, train,
                            path=tmp_path / str(compiled))
        logs[compiled] = _run([sys.executable, str(out.file("train.py")), "--cpu"], tmp_path)
        losses[compiled] = [m["loss"] for m in _metrics(out) if "loss" in m]
    assert "torch.compile:" not in logs[False]
    line = next(x for x in logs[True].splitlines() if x.startswith("torch.compile:"))
    graphs = int(line.split(", ")[1].split()[0])
    assert line.startswith("torch.compile: 4 decoder layers") and graphs >= 1, line   # tiny: 4 layers
    assert len(losses[True]) == SPEC.steps
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_compile_is_refused_with_the_fix_before_training(tmp_path, monkeypatch):
    """No C++ compiler, or a model without decoder layers: the script stops with what to do."""
    import torch

    out = export_script(ll.AdapterSpec(r=4), None, SPEC.replace(compile=True), path=tmp_path / "x")
    script = _import(out.file("train.py"), "exported_compile")
    assert script.TRAIN["compile"] is True
    model, _ = ll.load_model("builtin:tiny", device="cpu")
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with pytest.raises(SystemExit, match=r"C\+\+ compiler \(no-such-compiler-here not on PATH\).*"
                       r"TRAIN\['compile'\] = False"):
        script.compile_layers(model, "cpu")
    monkeypatch.delenv("CXX")
    with pytest.raises(SystemExit, match=r"Sequential lists none.*TRAIN\['compile'\] = False"):
        script.compile_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)), "cpu")
    assert all(m._compiled_call_impl is None for m in model.modules())   # nothing changed
