"""Checkpoints are atomic and hold only tensors and plain containers."""

from __future__ import annotations

import pytest
import torch

from lora_lab.errors import TrainingError
from lora_lab.train import checkpoint as ck


def test_a_failed_save_leaves_the_last_good_checkpoint(lora_tiny, tmp_path, monkeypatch):
    model, _ = lora_tiny
    first = ck.save_checkpoint(model, tmp_path, 1, {"reason": "checkpoint", "loss": 1.0})
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    real = ck._save_adapter

    def crash(model, path, adapter):  # a crash halfway through writing the new checkpoint
        real(model, path, adapter)
        raise OSError("disk full")

    monkeypatch.setattr(ck, "_save_adapter", crash)
    with pytest.raises(OSError, match="disk full"):
        ck.save_checkpoint(model, tmp_path, 1, {"reason": "checkpoint", "loss": 2.0})
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert (tmp_path / "latest").read_text() == first.name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-000001", "latest"]
    state = ck.load_training_state(tmp_path)
    assert state["loss"] == 1.0 and state["path"] == str(first)


def test_state_loads_with_weights_only_and_restores_exactly(lora_tiny, tmp_path):
    model, _ = lora_tiny
    path = ck.save_checkpoint(model, tmp_path, 7, {"reason": "checkpoint", "history": [{"a": 1.0}]})
    raw = torch.load(path / ck.STATE_FILE, weights_only=True)  # raises if anything else was pickled
    assert raw["step"] == 7 and raw["history"] == [{"a": 1.0}]
    want = ck.trainable_state(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.zero_()
    ck.restore_trainable(model, raw["trainable"])
    for name, t in ck.trainable_state(model).items():
        assert torch.equal(t, want[name])
    with pytest.raises(TrainingError, match="does not fit"):
        ck.restore_trainable(model, {"nope.weight": torch.zeros(1)})


def test_keep_last_prunes_old_checkpoints_and_resolve_finds_the_newest(lora_tiny, tmp_path):
    model, _ = lora_tiny
    for step in (1, 2, 3, 4):
        ck.save_checkpoint(model, tmp_path, step, {}, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == [
        "checkpoint-000003", "checkpoint-000004"]
    assert ck.resolve_checkpoint(tmp_path).name == "checkpoint-000004"
    with pytest.raises(TrainingError, match="no lora_lab checkpoint"):
        ck.resolve_checkpoint(tmp_path / "missing")
