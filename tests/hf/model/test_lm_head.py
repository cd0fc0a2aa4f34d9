"""The LM head's input is made contiguous, so a frozen bf16 model on a CPU does not copy its head's
weight once per prompt when ``generate`` asks for the last position's logits (hf/model/lm_head.py).

Oracles: PyTorch's profiler (the largest single allocation of the forward) and the model's own
full-sequence logits (the last position must be the same)."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import lora_lab as ll

B, T = 8, 12


def _batch(vocab: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for i in range(B):  # left padding of different lengths, as batched generation has
        mask[i, : i % 4] = 0
    return ids, mask


def _largest_allocation(model, ids, mask) -> int:
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
    return max(e.cpu_memory_usage for e in prof.events())


def _expanded_head_bytes(model) -> int:
    head = model.get_output_embeddings().weight
    return B * head.shape[0] * head.shape[1] * head.element_size()  # (B, d, V) in bf16


def test_loaded_and_attached_model_does_not_copy_the_head_per_row(tiny_llama_dir):
    model, _ = ll.load_model(tiny_llama_dir, device="cpu", dtype=torch.bfloat16)
    model = ll.attach(model, ll.AdapterSpec(r=4))  # freezes the base, the head with it
    model.eval()
    assert not model.get_output_embeddings().weight.requires_grad
    ids, mask = _batch(model.config.vocab_size)
    assert _largest_allocation(model, ids, mask) < _expanded_head_bytes(model) / 2
    with torch.no_grad():
        last = model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits
        full = model(input_ids=ids, attention_mask=mask).logits[:, -1:]
    assert last.shape == (B, 1, model.config.vocab_size)
    torch.testing.assert_close(last, full, atol=2e-2, rtol=2e-2)  # bf16 products, other summation order


def test_the_copy_it_avoids_exists_in_plain_transformers(tiny_llama_dir):
    """The control: the same frozen bf16 model from plain transformers allocates the (B, d, V) copy.
    When PyTorch fixes its CPU bmm (pytorch/pytorch#151934) this skips, and the hook can go."""
    from transformers import AutoModelForCausalLM

    from lora_lab.hf.model.lm_head import keep_head_input_contiguous

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16).eval()
    model.requires_grad_(False)
    ids, mask = _batch(model.config.vocab_size)
    if _largest_allocation(model, ids, mask) < _expanded_head_bytes(model):
        pytest.skip("this PyTorch no longer copies the expanded head weight; lm_head.py is not needed")
    keep_head_input_contiguous(model)
    assert _largest_allocation(model, ids, mask) < _expanded_head_bytes(model) / 2


def test_hook_is_installed_once_and_leaves_contiguous_input_alone(tiny_llama_dir):
    from lora_lab.hf.model.lm_head import keep_head_input_contiguous

    model, _ = ll.load_model(tiny_llama_dir, device="cpu")
    head = model.get_output_embeddings()
    n = len(head._forward_pre_hooks)
    keep_head_input_contiguous(model)
    keep_head_input_contiguous(model)
    assert len(head._forward_pre_hooks) == n == 1
    x = torch.randn(2, 3, model.config.hidden_size)
    seen = []
    head.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    head(x)
    assert seen[0] is x  # already contiguous: passed through, not copied
