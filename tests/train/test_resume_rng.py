"""Resuming restores the CUDA random state too (issue 23, item 8).

LoRA dropout on a GPU draws from the CUDA generator; restoring only the CPU one made a resumed GPU
run see different dropout masks from the uninterrupted run.  The states are uint8 tensors stored
like the CPU state, in ``training_state.pt``, read with ``torch.load(weights_only=True)``.

On a CPU-only machine the CUDA calls are stood in for (the plumbing: save → weights-only load →
``set_rng_state_all``); the ``gpu`` test checks the real thing: with dropout, 4 steps in one go and
2 + 2 resumed give the same losses (the old loop fails it: the resumed run restarts the CUDA
generator from the seed).
"""

from __future__ import annotations

import pytest
import torch

import lora_lab as ll
from lora_lab.train import checkpoint as ck
from lora_lab.train.loop import train


class _FakeCuda:
    """Two CUDA generators, as ``torch.cuda`` would report them."""

    def __init__(self, monkeypatch):
        self.states = [torch.arange(16, dtype=torch.uint8), torch.arange(16, 32, dtype=torch.uint8)]
        self.restored = None
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in self.states])
        monkeypatch.setattr(torch.cuda, "set_rng_state_all",
                            lambda states: setattr(self, "restored", list(states)))


def test_cuda_rng_states_round_trip_through_a_weights_only_checkpoint(lora_tiny, tmp_path,
                                                                      monkeypatch):
    model, _ = lora_tiny
    cuda = _FakeCuda(monkeypatch)
    path = ck.save_checkpoint(model, tmp_path, 3, {"reason": "checkpoint", **ck.rng_state()})
    raw = torch.load(path / ck.STATE_FILE, weights_only=True)  # raises if anything else was pickled
    assert [torch.equal(a, b) for a, b in zip(raw["cuda_rng"], cuda.states)] == [True, True]
    torch.manual_seed(123)  # move the CPU generator away from the saved state
    ck.restore_rng_state(ck.load_training_state(tmp_path))
    assert torch.equal(torch.get_rng_state(), raw["rng"])
    assert len(cuda.restored) == 2 and all(torch.equal(a, b) for a, b in zip(cuda.restored, cuda.states))


def test_the_loop_saves_the_rng_states_and_older_checkpoints_still_resume(lora_tiny, rows, tmp_path):
    model, tok = lora_tiny
    train(model, tok, rows, spec=ll.TrainSpec(steps=1, batch_size=4, output_dir=str(tmp_path)))
    saved = ck.load_training_state(tmp_path)
    assert "rng" in saved and "cuda_rng" in saved
    if not torch.cuda.is_available():
        assert saved["cuda_rng"] is None
    ck.restore_rng_state({"rng": saved["rng"]})  # a checkpoint written before the CUDA state


@pytest.mark.gpu
def test_resumed_gpu_run_with_dropout_matches_the_uninterrupted_one(tiny_llama_dir, tmp_path):
    from conftest import token_rows  # noqa: E402  (tests/train/conftest.py)

    def fresh():
        model, tok = ll.load_model(tiny_llama_dir, device="cuda")
        torch.manual_seed(0)
        return ll.attach(model, ll.AdapterSpec(r=8, dropout=0.3)), tok

    model, tok = fresh()
    rows = token_rows(tok)
    spec = ll.TrainSpec(steps=4, batch_size=4, lr=5e-3, schedule="constant", precision="fp32",
                        output_dir=str(tmp_path / "run"))
    full = train(model, tok, rows, spec=spec.replace(output_dir=str(tmp_path / "full")))

    class StopAt2:
        def on_step(self, state, control):
            if state.step == 2:
                control.stop()

    model, _ = fresh()
    train(model, tok, rows, spec=spec, callbacks=[StopAt2()])
    torch.cuda.manual_seed_all(999)  # whatever the CUDA generator did in between
    model, _ = fresh()
    rest = train(model, tok, rows, spec=spec, resume_from=tmp_path / "run")
    torch.testing.assert_close(torch.tensor(rest.loss.to_numpy()), torch.tensor(full.loss.to_numpy()),
                               rtol=1e-5, atol=1e-6)
