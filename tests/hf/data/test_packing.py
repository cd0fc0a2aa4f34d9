"""Packing keeps every example to itself: the oracle is each example run alone.

A packed batch (``DataSpec(packing=True)`` → ``pad_batch``) must give every supervised token the
loss it has when its example is the only one in the row.  Plain concatenation with an all-ones mask
(the old packing, rebuilt below as ``_concatenated``) fails this by orders of magnitude on
``builtin:tiny``: 0.0033 unpacked against 11.9 concatenated on a task it knows (``copy``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lora_lab as ll
from lora_lab.hf.data.packing import count_tokens, pack_examples
from lora_lab.hf.data.prepare import IGNORE_INDEX, pad_batch, prepare_dataset
from lora_lab.train.data import Batches, batch_tokens

SPEC = ll.DataSpec(eval_fraction=0, max_length=96)


def _token_losses(model, batch: dict) -> torch.Tensor:
    """(B, T-1) cross-entropy of logit t against label t+1 (0 where the label is -100)."""
    logits = model(**batch, use_cache=False).logits.float()
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
                           reduction="none")


def _alone(model, examples, pad_id) -> list[torch.Tensor]:
    """Each example's supervised token losses with the example alone in its row."""
    out = []
    for ex in examples:
        loss = _token_losses(model, pad_batch([ex], pad_id))[0]
        out.append(loss[torch.as_tensor(ex["labels"][1:]) != IGNORE_INDEX])
    return out


def _packed(model, examples, packs, pad_id) -> list[torch.Tensor]:
    """The same examples' supervised token losses, read from the packed batch."""
    losses = _token_losses(model, pad_batch(packs, pad_id))
    out, k = [], 0
    for r, pack in enumerate(packs):
        off = 0
        while off < len(pack["input_ids"]):
            n = len(examples[k]["input_ids"])
            keep = torch.as_tensor(examples[k]["labels"][1:]) != IGNORE_INDEX
            out.append(losses[r, off:off + n - 1][keep])
            off, k = off + n, k + 1
    assert k == len(examples)
    return out


def _concatenated(examples, max_length):
    """The old packing: examples concatenated, an all-ones mask, no position ids."""
    packs = []
    for ex in examples:
        if not packs or len(packs[-1]["input_ids"]) + len(ex["input_ids"]) > max_length:
            packs.append({"input_ids": [], "labels": [], "attention_mask": []})
        packs[-1]["input_ids"] += ex["input_ids"]
        packs[-1]["labels"] += ex["labels"]
        packs[-1]["attention_mask"] += [1] * len(ex["input_ids"])
    return packs


def _examples_and_packs(tok, task="copy", n=12, spec=SPEC):
    data = ll.builtin_task(task, n=n)
    examples = prepare_dataset(data, tok, spec).train.to_list()
    packs = prepare_dataset(data, tok, spec.replace(packing=True)).train.to_list()
    assert len(packs) < len(examples)  # several examples share a row
    return examples, packs


def _assert_same(got, want, atol=1e-5):
    """Equal to float rounding: atol 1e-5, plus 1e-6 of the loss (losses reach ~20)."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=atol, rtol=1e-6)


@pytest.fixture(scope="module")
def tiny():
    model, tok = ll.load_model("builtin:tiny", device="cpu")
    return model.eval(), tok


@torch.no_grad()
def test_packed_losses_equal_alone_on_builtin_tiny(tiny, one_thread):
    model, tok = tiny
    examples, packs = _examples_and_packs(tok)
    want = _alone(model, examples, tok.pad_token_id)
    _assert_same(_packed(model, examples, packs, tok.pad_token_id), want)
    # the old concatenation fails the same oracle: the model knows "copy" alone, not packed
    old = _token_losses(model, pad_batch(_concatenated(examples, SPEC.max_length),
                                         tok.pad_token_id))
    alone_mean = torch.cat(want).mean()
    old_mean = old.sum() / sum(int(torch.as_tensor(e["labels"][1:]).ne(IGNORE_INDEX).sum())
                               for e in examples)
    assert alone_mean < 0.05 and old_mean > 20 * alone_mean


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@torch.no_grad()
def test_packed_losses_equal_alone_on_tiny_llama(tiny_llama, attn, one_thread):
    model, tok = tiny_llama
    model.set_attn_implementation(attn)
    model.eval()
    examples, packs = _examples_and_packs(tok, "reverse")
    _assert_same(_packed(model, examples, packs, tok.pad_token_id),
                 _alone(model, examples, tok.pad_token_id))


def test_packed_loss_and_grads_under_lora_and_checkpointing(tiny_llama, one_thread):
    """In train mode, through peft and gradient checkpointing (the model called as the loop calls
    it): the packed batch's summed loss and LoRA gradients equal the sums over examples alone."""
    model, tok = tiny_llama
    model = ll.attach(model, ll.AdapterSpec(r=4, dropout=0.0, target_modules="all-linear"))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)  # a non-zero ΔW, so the adapter changes the losses
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    examples, packs = _examples_and_packs(tok, "upper", n=8)
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(batches):
        model.zero_grad(set_to_none=True)
        total = sum(_token_losses(model, b).sum() for b in batches)
        total.backward()
        return total.detach(), [p.grad.clone() for p in params]

    pad = tok.pad_token_id
    packed, g_packed = loss_and_grads([pad_batch(packs, pad)])
    alone, g_alone = loss_and_grads([pad_batch([e], pad) for e in examples])
    torch.testing.assert_close(packed, alone, atol=1e-4, rtol=1e-5)
    for a, b in zip(g_packed, g_alone):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_packed_losses_equal_alone_on_smollm2(smollm2, one_thread):
    model, tok = smollm2
    rows = ll.builtin_task("capitals", n=4)
    spec = ll.DataSpec(eval_fraction=0, max_length=256)
    examples = prepare_dataset(rows, tok, spec).train.to_list()
    packs = prepare_dataset(rows, tok, spec.replace(packing=True)).train.to_list()
    assert len(packs) == 1
    _assert_same(_packed(model.eval(), examples, packs, tok.pad_token_id),
                 _alone(model, examples, tok.pad_token_id), atol=1e-4)


def test_pack_layout():
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                {"input_ids": [8, 9], "labels": [8, 9]},
                {"input_ids": [1, 2, 3, 4], "labels": [1, 2, 3, 4]}]
    packs = pack_examples(examples, max_length=6)
    assert packs == [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, -100, 9],
                      "position_ids": [0, 1, 2, 0, 1]},
                     {"input_ids": [1, 2, 3, 4], "labels": [-100, 2, 3, 4],
                      "position_ids": [0, 1, 2, 3]}]
    batch = pad_batch(packs, pad_token_id=0)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["labels"][1, 4] == IGNORE_INDEX and batch["input_ids"][1, 4] == 0
    assert count_tokens(batch) == batch_tokens(batch) == 9


def test_prepare_packs_train_only_and_keeps_counts(tiny):
    _, tok = tiny
    data = ll.builtin_task("copy", n=40)
    spec = ll.DataSpec(eval_fraction=0.25, max_length=64)
    plain, packed = prepare_dataset(data, tok, spec), prepare_dataset(data, tok, spec.replace(packing=True))
    assert packed.train.column_names == ["input_ids", "position_ids", "labels"]
    assert packed.eval.column_names == plain.eval.column_names  # eval is not packed
    assert packed.eval.to_list() == plain.eval.to_list()
    assert (packed.n_train_tokens, packed.n_label_tokens) == (plain.n_train_tokens, plain.n_label_tokens)
    assert sum(map(len, packed.train["input_ids"])) == plain.n_train_tokens
    assert all(len(x) <= 64 for x in packed.train["input_ids"])
    rows = packed.train.to_list()
    batch = Batches(rows, batch_size=len(rows), seed=0, pad_id=tok.pad_token_id)(0)  # all rows
    assert "attention_mask" not in batch
    assert batch_tokens(batch) == plain.n_train_tokens


def test_packed_row_with_padding_inside_is_refused():
    with pytest.raises(ll.DataError, match="position_ids"):
        pad_batch([{"input_ids": [1, 2, 3], "position_ids": [0, 1, 0], "attention_mask": [1, 1, 0]}], 0)
