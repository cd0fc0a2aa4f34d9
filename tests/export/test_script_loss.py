"""The exported train.py's chunked loss against lora_lab's own, for a frozen head: the same loss and
gradient bit for bit (fp32, bf16 and fp16 heads, blocks of 1, 3 and all rows, ignored rows, one
of them overflowed to inf), and both against ``F.cross_entropy`` with autograd."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

import lora_lab as ll
from lora_lab.core import logits as logits_rules
from lora_lab.export.script import export_script
from lora_lab.hf.training.chunked_loss import _chunk_loss_and_grad

C, H, V = 13, 16, 50


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = export_script(ll.AdapterSpec(r=4), None, ll.TrainSpec(steps=2), path=tmp_path_factory.mktemp("x"))
    spec = importlib.util.spec_from_file_location("exported_loss", out.file("train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.LOSS_BLOCK_BYTES == logits_rules.LOSS_BLOCK_BYTES
    return module


def _case(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(H, V, bias=False).to(dtype).requires_grad_(False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g) * 0.5)
    hidden = torch.randn(C, H, generator=g).to(dtype)
    targets = torch.randint(0, V, (C,), generator=g)
    targets[[0, 5, 6, 12]] = -100                    # ignored rows, at block edges and inside
    return head, hidden, targets


def _oracle(head, hidden, targets):
    """F.cross_entropy on the fp32 upcast of the head's output, its gradient by autograd."""
    h = hidden.detach().requires_grad_()
    loss = F.cross_entropy(head(h).float(), targets, ignore_index=-100, reduction="sum")
    (g,) = torch.autograd.grad(loss, h)
    return loss.detach(), g


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, C])
def test_exported_loss_is_lora_labs_bit_for_bit(exported, monkeypatch, dtype, rows):
    monkeypatch.setattr(logits_rules, "LOSS_BLOCK_BYTES", rows * 4 * V)
    monkeypatch.setattr(exported, "LOSS_BLOCK_BYTES", rows * 4 * V)
    head, hidden, targets = _case(dtype)
    ours = _chunk_loss_and_grad(head, hidden, targets)
    theirs = exported.chunk_loss_and_grad(head, hidden, targets)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    ref_loss, ref_grad = _oracle(head, hidden, targets)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert abs(float(ours[0]) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    assert float((ours[1].float() - ref_grad.float()).norm() / ref_grad.float().norm()) <= tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_size_changes_nothing(monkeypatch, dtype):
    """Blocks of 1 row and one block of all rows: the same gradient bit for bit, the same loss up to
    the order of its fp32 sum."""
    head, hidden, targets = _case(dtype, seed=1)
    results = []
    for rows in (1, C):
        monkeypatch.setattr(logits_rules, "LOSS_BLOCK_BYTES", rows * 4 * V)
        results.append(_chunk_loss_and_grad(head, hidden, targets))
    assert torch.equal(results[0][1], results[1][1])
    assert abs(float(results[0][0]) - float(results[1][0])) <= 1e-6 * float(results[1][0])


def test_an_overflowed_ignored_row_leaves_the_loss_finite(exported):
    """fp16 logits that overflowed to inf in a row whose label is ignored (a padded position):
    F.cross_entropy ignores the row; so do both chunked losses (no nan·0)."""
    head, hidden, targets = _case(torch.float16, seed=2)
    hidden[5] = 6e4                                  # targets[5] = -100; head(h)[5] overflows fp16
    assert torch.isinf(head(hidden[5:6])).any()
    ref_loss, ref_grad = _oracle(head, hidden, targets)
    for loss, grad in (_chunk_loss_and_grad(head, hidden, targets),
                       exported.chunk_loss_and_grad(head, hidden, targets)):
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
        assert torch.equal(grad[5], torch.zeros_like(grad[5]))
