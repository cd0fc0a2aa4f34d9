"""The chunked causal-LM loss against transformers' own loss: same value and gradients, one chunk of
logits alive at a time, and refusals with the reason.

Oracle: ``model(**batch).loss`` (transformers' ``ForCausalLMLoss``: fp32 upcast, shift by one,
ignore_index=-100, mean over supervised tokens).  Chunked: ``Σ ℓ / n`` from
:func:`chunked_causal_lm_loss`.  fp32: loss and every trainable gradient within 1e-5 relative.
"""

from __future__ import annotations

import pytest
import torch

import lora_lab as ll
from lora_lab.errors import LoraLabError, TrainingError
from lora_lab.hf.training.chunked_loss import (
    AUTO_MIN_VOCAB,
    chunked_causal_lm_loss,
    chunked_unsupported,
    use_chunked,
)

B, T, VOCAB = 3, 20, 300


def _tiny(tied: bool, vocab: int = VOCAB, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tied, pad_token_id=0)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def _lora(model, targets="all-linear"):
    torch.manual_seed(1)
    model = ll.attach(model, ll.AdapterSpec(r=4, target_modules=targets))
    with torch.no_grad():  # B = 0 at init: make every LoRA gradient non-trivial
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    return model


def _batch(vocab: int = VOCAB, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, -5:] = 0                       # right padding in row 1
    labels = ids.clone()
    labels[:, :6] = -100                   # a masked prompt
    labels[mask == 0] = -100
    labels[2, 10:13] = -100                # a hole
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _full(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    return float(loss.detach()), _grads(model)


def _chunked(model, batch, chunk):
    model.zero_grad(set_to_none=True)
    total, n = chunked_causal_lm_loss(model, batch, chunk_size=chunk, use_cache=False)
    loss = total / n
    loss.backward()
    return float(loss.detach()), _grads(model), n


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _assert_same(model, batch, chunk, tol=1e-5):
    ref_loss, ref = _full(model, batch)
    loss, got, n = _chunked(model, batch, chunk)
    assert n == int((batch["labels"][:, 1:] != -100).sum())
    assert abs(loss - ref_loss) <= tol * abs(ref_loss)
    assert got.keys() == ref.keys() and ref
    worst = max(_rel(got[k], ref[k]) for k in ref)
    assert worst <= tol, worst
    return worst


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("chunk", [1, 7, B * (T - 1), 10_000])
def test_same_loss_and_grads_as_transformers(one_thread, tied, chunk):
    _assert_same(_lora(_tiny(tied)), _batch(), chunk)


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("chunk", [7, B * (T - 1)])
def test_blocks_of_rows_give_the_same_loss_and_grads(one_thread, monkeypatch, rows, chunk):
    """A frozen head's logits become their gradient ``rows`` at a time (ragged last blocks, ignored
    rows inside blocks): still transformers' loss and gradients, in fp32 and under bf16 autocast."""
    from lora_lab.core import logits

    monkeypatch.setattr(logits, "LOSS_BLOCK_BYTES", rows * 4 * VOCAB)
    assert logits.loss_block_rows(VOCAB) == rows
    model, batch = _lora(_tiny(True)), _batch()
    _assert_same(model, batch, chunk)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, ref = _full(model, batch)
        loss, got, _ = _chunked(model, batch, chunk)
    assert abs(loss - ref_loss) <= 1e-3 * abs(ref_loss)
    assert max(_rel(got[k], ref[k]) for k in ref) <= 2e-2


@pytest.mark.parametrize("how", ["lora", "trainable"])
def test_adapted_or_trainable_lm_head_is_handled(one_thread, how):
    """lm_head as a LoRA target, or fully trainable (peft's modules_to_save): it is just a module
    called per chunk, so its gradients match too (lora_lab's attach does not offer either; peft
    users can)."""
    import peft

    extra = dict(target_modules=["q_proj", "v_proj", "lm_head"]) if how == "lora" else dict(
        target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    torch.manual_seed(1)
    model = peft.get_peft_model(_tiny(False), peft.LoraConfig(r=4, **extra))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    assert any("lm_head" in n for n, p in model.named_parameters() if p.requires_grad)
    _assert_same(model, _batch(), 7)


def test_packed_rows_with_position_ids(one_thread):
    model = _lora(_tiny(False))
    batch = _batch()
    batch.pop("attention_mask")
    batch["position_ids"] = torch.cat([torch.arange(12), torch.arange(8)]).expand(B, T)
    _assert_same(model, batch, 5)


def test_bf16_autocast_close(one_thread):
    """Under bf16 autocast both losses run the head in bf16 and the CE in fp32; the two orders of
    summation differ by bf16 rounding of the logits only: within 1e-3 (loss) and 2e-2 (grads)."""
    model, batch = _lora(_tiny(False)), _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, ref = _full(model, batch)
        loss, got, _ = _chunked(model, batch, 7)
    assert abs(loss - ref_loss) <= 1e-3 * abs(ref_loss)
    assert max(_rel(got[k], ref[k]) for k in ref) <= 2e-2


def test_qlora_nf4_base(tiny_llama_nf4, one_thread):
    model, tok = tiny_llama_nf4
    model = _lora(model)
    vocab = model.get_base_model().get_output_embeddings().weight.shape[0]
    _assert_same(model, _batch(vocab), 16)


@pytest.mark.parametrize("head", ["frozen", "lora"])
def test_only_one_chunk_of_logits_at_a_time(one_thread, head):
    """A hook on lm_head sees (chunk, V) outputs only.  A frozen head runs once per chunk (its
    gradient is taken in the forward: as many head matmuls as the full loss); an adapted head's
    chunks are recomputed once in the backward."""
    import peft

    if head == "frozen":
        model = _lora(_tiny(True))
    else:
        model = peft.get_peft_model(_tiny(False), peft.LoraConfig(
            r=4, target_modules=["q_proj", "v_proj", "lm_head"]))
    batch, chunk = _batch(), 8
    shapes = []
    base_head = model.get_base_model().get_output_embeddings()
    handle = base_head.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    try:
        total, n = chunked_causal_lm_loss(model, batch, chunk_size=chunk, use_cache=False)
        forward_calls = len(shapes)
        (total / n).backward()
    finally:
        handle.remove()
    assert max(s[0] for s in shapes) == chunk and all(s[-1] == VOCAB for s in shapes)
    assert len(shapes) == (1 if head == "frozen" else 2) * forward_calls
    assert forward_calls <= -(-B * (T - 1) // chunk)


def test_bad_chunk_sizes_refused(one_thread):
    model, batch = _lora(_tiny(True)), _batch()
    for bad in (0, -3, 1.5, True, "512"):
        with pytest.raises(TrainingError, match="positive") as info:
            chunked_causal_lm_loss(model, batch, chunk_size=bad)
        assert "loss_chunk_size=" in info.value.fix


def test_prompt_learning_refused_with_reason(one_thread):
    model = ll.attach(_tiny(True), ll.AdapterSpec(method="prompt", num_virtual_tokens=4))
    why = chunked_unsupported(model)
    assert why and "virtual tokens" in why
    with pytest.raises(LoraLabError, match="virtual tokens") as info:
        chunked_causal_lm_loss(model, _batch())
    assert "chunked_loss=False" in info.value.fix
    assert use_chunked("auto", model) is False


def test_model_without_reachable_head_refused():
    class NoHead(torch.nn.Module):
        def forward(self, **kw):
            raise AssertionError("not called")

    assert "output layer" in chunked_unsupported(NoHead())
    with pytest.raises(TrainingError, match="output layer") as info:
        chunked_causal_lm_loss(NoHead(), _batch())
    assert "chunked_loss=False" in info.value.fix and "Fix:" in str(info.value)
    assert use_chunked("auto", NoHead()) is False          # "auto" keeps the full loss there


def test_auto_rule_by_vocabulary(one_thread):
    small = _lora(_tiny(True))
    big = _lora(_tiny(True, vocab=AUTO_MIN_VOCAB))
    assert use_chunked("auto", small) is False and use_chunked("auto", big) is True
    assert use_chunked(True, small) is True and use_chunked(False, big) is False
