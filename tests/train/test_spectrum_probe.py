"""SpectrumProbe: snapshots grow during training and hold the spectra of the adapter at that step."""

from __future__ import annotations

import pytest
import torch

from lora_lab.errors import LoraLabError
from lora_lab.hf.adapters.factors import lora_factors
from lora_lab.hf.spectra.analysis import adapter_spectra
from lora_lab.train.events import Control, TrainState, emit
from lora_lab.train.loop import train
from lora_lab.train.spectrum_probe import SpectrumProbe


def test_probe_follows_the_events(lora_tiny, monkeypatch):
    import time

    from lora_lab.train import spectrum_probe

    # overhead_s must be the time of the snapshots: each is slowed by a known 10 ms and timed on
    # its own, from outside; overhead_s must be their sum, not 0 and not the time between events
    real, timed = spectrum_probe.adapter_spectra, []

    def slow_spectra(*args, **kw):
        t0 = time.perf_counter()
        time.sleep(0.01)
        out = real(*args, **kw)
        timed.append(time.perf_counter() - t0)
        return out

    monkeypatch.setattr(spectrum_probe, "adapter_spectra", slow_spectra)
    model, _ = lora_tiny
    probe = SpectrumProbe(model, every=2)
    control, seen = Control(), {}
    emit([probe], "begin", TrainState("begin", 0, 5), control)
    for step in range(1, 6):
        with torch.no_grad():                         # stand-in for an optimizer step
            for m in model.modules():
                if hasattr(m, "lora_B") and "default" in m.lora_B:
                    m.lora_B["default"].weight.add_(0.01 * torch.randn_like(m.lora_B["default"].weight))
        emit([probe], "step", TrainState("step", step, 5), control)
        f = next(iter(lora_factors(model)))
        seen[step] = torch.linalg.svdvals(f.scaling * f.B.double() @ f.A.double())
    emit([probe], "end", TrainState("end", 5, 5), control)
    emit([probe], "end", TrainState("end", 5, 5), control)     # no duplicate snapshot
    assert probe.steps == [0, 2, 4, 5]
    name = next(iter(lora_factors(model))).name
    evo = probe.evolution(name)
    assert evo[0][1].top == 0                                   # B = 0 at the start
    for step, sp in evo[1:]:
        torch.testing.assert_close(sp.values, seen[step][: len(sp)], rtol=1e-8, atol=1e-12)
    frame = probe.frame()
    assert len(frame) == 4 * len(probe.snapshots[0][1]) and set(frame["step"]) == {0, 2, 4, 5}
    assert "4 snapshots" in repr(probe) and len(timed) == 4
    assert sum(timed) <= probe.overhead_s < sum(timed) + 0.01, (probe.overhead_s, timed)
    with pytest.raises(LoraLabError, match="no module"):
        probe.evolution("nope")
    with pytest.raises(LoraLabError, match="every"):
        SpectrumProbe(model, every=0)


def test_probe_snapshots_grow_during_training(lora_tiny, rows, tmp_path):
    import lora_lab as ll

    model, tok = lora_tiny
    probe = SpectrumProbe(model, every=2)
    counts = []

    class Count:
        def on_step(self, state, control):
            counts.append(len(probe.snapshots))

    spec = ll.TrainSpec(steps=4, batch_size=2, lr=5e-3, schedule="constant",
                        output_dir=str(tmp_path / "run"))
    train(model, tok, rows, spec=spec, callbacks=[probe, Count()])
    assert counts == sorted(counts) and counts[-1] > counts[0]
    assert probe.steps == [0, 2, 4]
    erank = probe.frame().groupby("step")["effective_rank"].mean()
    assert erank[0] == 0 and erank[4] > 1                       # ΔW grows from zero
    final = adapter_spectra(model).table
    assert probe.snapshots[-1][1].table["top_sigma"].to_list() == pytest.approx(
        final["top_sigma"].to_list())
