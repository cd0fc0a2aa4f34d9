"""Issue 16, bug 1: ``train()`` on a model without an adapter must refuse before the first step and
change nothing (it used to train every base weight in place, then fail to save an adapter)."""

from __future__ import annotations

import pytest
import torch

import lora_lab as ll
from lora_lab.errors import TrainingError


def test_plain_model_is_refused_before_anything_changes(tiny_llama, tmp_path, monkeypatch):
    model, tok = tiny_llama
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(grads.values())  # a freshly loaded model: every weight would train
    monkeypatch.chdir(tmp_path)  # the default run folder would be runs/<stamp>-adapter here
    rows = [{"prompt": "abc", "response": "ABC"}] * 8
    with pytest.raises(TrainingError, match=r"(?s)no adapter.*attach") as info:
        ll.train(model, tok, rows, spec=ll.TrainSpec(steps=2, batch_size=2, lr=1e-1))
    assert f"{sum(t.numel() for t in before.values()):,}" in str(info.value)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.grad is None, n
        assert p.requires_grad == grads[n], n
    assert not getattr(model, "is_gradient_checkpointing", False)
    assert not (tmp_path / "runs").exists()  # no empty run folder is left behind
