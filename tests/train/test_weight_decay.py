"""Weight decay leaves out biases and norm weights, by transformers.Trainer's rule (issue 23, item 4).

Oracle: ``transformers.Trainer.get_decay_parameter_names`` (5.x: no decay inside an ``nn.LayerNorm``
nor for names matching bias/layernorm/rmsnorm/norm), applied to models with trainable biases, RMSNorm
weights (Llama: named ``*_layernorm`` and ``norm``) and LayerNorm weights under names without "norm"
(GPT-2's ``ln_1``, ``ln_f``: caught by the type).  The old single group decayed all of them.
"""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Trainer

import lora_lab as ll
from lora_lab.train.optim import build_optimizer, param_groups


def _trainer_decay(model) -> set[str]:
    """The trainable parameters the Trainer decays (``self`` is unused by the method)."""
    names = set(Trainer.get_decay_parameter_names(None, model))
    return {n for n, p in model.named_parameters() if p.requires_grad and n in names}


def _ours(model, groups) -> dict[str, float]:
    """Parameter name → the weight decay of its optimizer group."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {by_id[id(p)]: g["weight_decay"] for g in groups for p in g["params"]}


def _llama_with_biases_and_norms():
    """A tiny Llama with attention and MLP biases, LoRA on all linears with bias="all", and its
    RMSNorm weights unfrozen: every kind of parameter the rule tells apart is trainable."""
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                      mlp_bias=True)
    torch.manual_seed(0)
    model = ll.attach(LlamaForCausalLM(cfg), ll.AdapterSpec(r=4, bias="all"))
    for name, p in model.named_parameters():
        if "norm" in name:
            p.requires_grad_(True)
    return model


def _gpt2_with_layernorms():
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0,
                     eos_token_id=0)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("transformer.h.") or name.startswith("transformer.ln_f"))
    return model


def test_decay_groups_equal_the_trainers_on_llama_and_gpt2():
    for model in (_llama_with_biases_and_norms(), _gpt2_with_layernorms()):
        ours = _ours(model, param_groups(model, 0.1))
        want = _trainer_decay(model)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert set(ours) == trainable  # every trainable parameter once, nothing frozen
        assert {n for n, wd in ours.items() if wd == 0.1} == want
        skipped = trainable - want
        assert skipped and all(ours[n] == 0.0 for n in skipped)
        # the old optimizer (one group) decayed these too: biases and norm weights
        assert any("bias" in n for n in skipped) and any("ln" in n or "norm" in n for n in skipped)
        assert any("lora_" in n or ".attn.c_attn.weight" in n for n in want)


def test_the_optimizer_uses_the_groups_and_lora_alone_stays_one_group():
    model = _llama_with_biases_and_norms()
    opt = build_optimizer(ll.TrainSpec(weight_decay=0.1), model, torch.device("cpu"))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert _ours(model, opt.param_groups) == _ours(model, param_groups(model, 0.1))
    # LoRA on linears without bias: nothing to leave out, so one group in the model's order (the
    # layout of checkpoints written before the split, which therefore still resume)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    lora = ll.attach(LlamaForCausalLM(cfg), ll.AdapterSpec(r=4))
    groups = param_groups(lora, 0.1)
    assert len(groups) == 1 and [id(p) for p in groups[0]["params"]] == \
        [id(p) for p in lora.parameters() if p.requires_grad]


def test_a_no_decay_parameter_is_not_pulled_to_zero_by_a_step(tiny_llama_dir, tmp_path, one_thread):
    """End to end through ``train``: SGD with weight decay adds wd·w to a decayed weight's gradient,
    so after one step w' = w - lr·(g + wd·w).  The final RMSNorm weight, unfrozen, must move by the
    loss gradient alone, w' = w - lr·g (the old single group gave w - lr·(g + 0.5·w)).
    """
    model, tok = ll.load_model(tiny_llama_dir, device="cpu")
    model = ll.attach(model, ll.AdapterSpec(r=4))
    norm = model.get_submodule("base_model.model.model.norm").weight
    norm.requires_grad_(True)
    before = norm.detach().clone()
    grads = {}
    norm.register_post_accumulate_grad_hook(lambda p: grads.__setitem__("g", p.grad.clone()))
    rows = [{"input_ids": [5, 6, 7, 8, 9], "labels": [5, 6, 7, 8, 9]}] * 2
    spec = ll.TrainSpec(steps=1, batch_size=2, lr=0.5, weight_decay=0.5, optimizer="sgd",
                        max_grad_norm=None, schedule="constant", output_dir=str(tmp_path / "r"))
    ll.train(model, tok, rows, spec=spec)
    # SGD with weight_decay adds wd·w to the gradient when decayed: here it must be the gradient alone
    torch.testing.assert_close(norm.detach(), before - 0.5 * grads["g"])
