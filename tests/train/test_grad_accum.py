"""Gradient accumulation weights tokens, not micro-batches (issue 23, item 1).

Oracle: one batch of all the step's rows, the token-mean cross-entropy computed here with
``torch.nn.functional.cross_entropy`` over every supervised (shifted) label, and its gradient.
``batch_size=4`` and ``batch_size=2, grad_accum=2`` must both give that loss and that gradient on
responses-only rows of very unequal response lengths (1, 2, 20 and 40 tokens): every pairing of
them into two micro-batches holds unequal supervised-token counts, which is where weighting each
micro-batch's mean equally (the old loop, and the Trainer before ``num_items_in_batch``) goes wrong.

Measured against the old loop (``loss_k / grad_accum``): see the numbers in the assertion message.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lora_lab as ll
from lora_lab.train.loop import train

RESPONSES = (1, 2, 20, 40)  # supervised tokens per row (before the shift drops none: prompt first)


def _rows(tok) -> list[dict]:
    """Rows "prompt → response" with the prompt masked (-100): responses of RESPONSES tokens."""
    from conftest import response_rows  # tests/train/conftest.py

    return response_rows(tok, RESPONSES)


def _model(tiny_llama_dir):
    """The tiny Llama with LoRA r=4 (no dropout) whose B factors are random, not zero, so that
    every adapter weight has a gradient at step 1."""
    model, tok = ll.load_model(tiny_llama_dir, device="cpu")
    torch.manual_seed(0)
    model = ll.attach(model, ll.AdapterSpec(r=4, target_modules="all-linear", dropout=0.0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model, tok


class _Grads:
    """Records each adapter weight's gradient after it is accumulated (the last record is the
    step's full gradient, before clipping and the optimizer step)."""

    def __init__(self, model):
        self.grads: dict[str, torch.Tensor] = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(
                    lambda p, name=name: self.grads.__setitem__(name, p.grad.detach().clone()))


def _oracle(tiny_llama_dir, rows, pad_id):
    """Loss and gradient of the token mean over all supervised tokens of ``rows``, in one batch."""
    model, _ = _model(tiny_llama_dir)
    T = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), T), pad_id)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], mask[i, :n], labels[i, :n] = (torch.tensor(r[k]) for k in
                                                  ("input_ids", "attention_mask", "labels"))
    model.train()
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    shift_logits, shift_labels = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
    n_sup = int((shift_labels != -100).sum())
    loss = loss / n_sup
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach()), grads, n_sup, (ids, mask, labels)


def _one_step(tiny_llama_dir, rows, tmp_path, **kw):
    model, tok = _model(tiny_llama_dir)
    rec = _Grads(model)
    spec = ll.TrainSpec(steps=1, lr=1e-3, schedule="constant", max_grad_norm=None, seed=3,
                        precision="fp32",  # exact fp32 math against the full batch (1e-6)
                        output_dir=str(tmp_path / f"run-{kw['batch_size']}x{kw['grad_accum']}"), **kw)
    res = train(model, tok, rows, spec=spec)
    return res.loss.iloc[0], rec.grads


def _diff(a: dict, b: dict) -> tuple[float, float]:
    """(‖a - b‖, ‖b‖) over all adapter weights."""
    d = torch.sqrt(sum(((a[n] - b[n]) ** 2).sum() for n in b))
    return float(d), float(torch.sqrt(sum((b[n] ** 2).sum() for n in b)))


def test_accumulated_step_equals_the_full_batch_token_mean(tiny_llama_dir, tmp_path, one_thread):
    tok = ll.load_model(tiny_llama_dir, device="cpu")[1]
    rows = _rows(tok)
    want_loss, want_grad, n_sup, _ = _oracle(tiny_llama_dir, rows, tok.pad_token_id)
    assert n_sup == sum(RESPONSES)
    loss4, grad4 = _one_step(tiny_llama_dir, rows, tmp_path, batch_size=4, grad_accum=1)
    loss2, grad2 = _one_step(tiny_llama_dir, rows, tmp_path, batch_size=2, grad_accum=2)
    d4, norm = _diff(grad4, want_grad)
    d2, _ = _diff(grad2, want_grad)
    msg = (f"‖g(bs4) - g_oracle‖ = {d4:.3g}, ‖g(bs2×ga2) - g_oracle‖ = {d2:.3g}, ‖g_oracle‖ = "
           f"{norm:.3g}; loss bs4 {loss4:.6f}, bs2×ga2 {loss2:.6f}, oracle {want_loss:.6f}")
    assert d4 <= 1e-6 * max(1.0, norm) and d2 <= 1e-6 * max(1.0, norm), msg
    assert loss4 == pytest.approx(want_loss, abs=1e-6) and loss2 == pytest.approx(want_loss, abs=1e-6), msg
    for name in want_grad:  # and weight by weight
        torch.testing.assert_close(grad2[name], want_grad[name], rtol=1e-5, atol=1e-6)


def test_the_oracle_is_transformers_num_items_in_batch_loss(tiny_llama_dir):
    """transformers' own loss with ``num_items_in_batch`` (the Trainer's 2024 fix), summed over two
    micro-batches, equals the token mean above: the oracle agrees with the Trainer's objective."""
    tok = ll.load_model(tiny_llama_dir, device="cpu")[1]
    rows = _rows(tok)
    want_loss, _, n_sup, (ids, mask, labels) = _oracle(tiny_llama_dir, rows, tok.pad_token_id)
    model, _ = _model(tiny_llama_dir)
    with torch.no_grad():
        total = sum(float(model(input_ids=ids[s], attention_mask=mask[s], labels=labels[s],
                                use_cache=False, num_items_in_batch=n_sup).loss)
                    for s in (slice(0, 2), slice(2, 4)))
    assert total == pytest.approx(want_loss, abs=1e-6)


def test_prompt_tuning_counts_the_label_its_last_virtual_token_predicts(tiny_llama_dir, tmp_path,
                                                                       one_thread):
    """Prompt tuning puts virtual tokens (label -100) before each row, so the row's first label is
    predicted too: n_k counts every label ≠ -100, not only ``labels[:, 1:]``.  Rows with full
    labels (the first one supervised) of unequal lengths: two micro-batches of 2 must give the loss
    and gradient of one batch of 4 (the model's own mean over all its supervised tokens)."""
    tok = ll.load_model(tiny_llama_dir, device="cpu")[1]
    rows = [{"input_ids": ids, "labels": list(ids)} for ids in
            ([7, 8], [9, 10, 11], [12] * 25, [13, 14] * 20)]

    def one_step(batch_size, grad_accum):
        model, _ = ll.load_model(tiny_llama_dir, device="cpu")
        torch.manual_seed(0)
        model = ll.attach(model, ll.AdapterSpec(method="prompt", num_virtual_tokens=3))
        rec = _Grads(model)
        spec = ll.TrainSpec(steps=1, batch_size=batch_size, grad_accum=grad_accum, lr=1e-3,
                            max_grad_norm=None, precision="fp32", output_dir=str(tmp_path / f"p{batch_size}"))
        return train(model, tok, rows, spec=spec).loss.iloc[0], rec.grads

    loss4, grad4 = one_step(4, 1)
    loss2, grad2 = one_step(2, 2)
    assert loss2 == pytest.approx(loss4, abs=1e-6)
    d, norm = _diff(grad2, grad4)
    assert d <= 1e-6 * max(1.0, norm), (d, norm)
