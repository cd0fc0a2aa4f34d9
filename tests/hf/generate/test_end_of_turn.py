"""Generation stops on the chat template's end-of-turn token as well as on eos.

A base tokenizer given a ChatML template ends turns with ``<|im_end|>`` while its eos is ``</s>``
(``<|endoftext|>`` for Qwen base models).  A model that answers and writes ``<|im_end|>`` must stop
there, with ``finish_reason="eos"``, not run on to ``max_new_tokens``.
"""

from __future__ import annotations

import copy

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import lora_lab as ll
from lora_lab.hf.generate.decode import decode_without_cache, stop_token_ids
from lora_lab.hf.generate.stream import generate, stream_generate
from lora_lab.hf.model.builtin import TOKENIZER_DIR

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _chatml_base_tokenizer():
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok


def _model_that_always_says(tok, token: str):
    """A tiny Llama whose greedy choice is always ``token`` (lm_head: zero weight, one-hot bias)."""
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    head = torch.nn.Linear(32, len(tok), bias=True)
    torch.nn.init.zeros_(head.weight)
    with torch.no_grad():
        head.bias.zero_()
        head.bias[tok.convert_tokens_to_ids(token)] = 10.0
    model.lm_head = head
    return model.eval()


def test_stop_token_ids_include_the_end_of_turn():
    tok = _chatml_base_tokenizer()
    model = _model_that_always_says(tok, "<|im_end|>")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert stop_token_ids(model, tok) == [im_end, tok.eos_token_id]
    assert stop_token_ids(model, tok, ll.DataSpec(use_chat_template=False)) == [tok.eos_token_id]


def test_generate_stops_on_im_end_when_eos_differs(one_thread):
    tok = _chatml_base_tokenizer()
    model = _model_that_always_says(tok, "<|im_end|>")
    out = generate(model, tok, "hi", max_new_tokens=6)
    assert out.token_ids == (tok.convert_tokens_to_ids("<|im_end|>"),)
    assert (out.finish_reason, out.text) == ("eos", "")
    assert list(stream_generate(model, tok, "hi", max_new_tokens=6)) == []
    # a model that never ends its turn still runs to the limit
    talker = _model_that_always_says(tok, "a")
    assert generate(talker, tok, "hi", max_new_tokens=4).finish_reason == "length"


def test_decode_without_cache_stops_on_the_same_ids(one_thread):
    tok = _chatml_base_tokenizer()
    model = _model_that_always_says(tok, "<|im_end|>")
    prompt = torch.tensor([ll.hf.data.prepare.encode_prompt(tok, "hi")])
    out = decode_without_cache(model, prompt, 6, stop_token_ids(model, tok))
    assert out.shape[1] == prompt.shape[1] + 1


def test_smollm2_as_a_base_model_stops_at_im_end(smollm2_dir, smollm2, one_thread):
    """SmolLM2 with its eos moved to <|endoftext|> (as a ChatML template on a base model): the answer
    still ends at <|im_end|>."""
    model, _ = smollm2
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    tok.eos_token = "<|endoftext|>"
    saved = model.generation_config
    model.generation_config = copy.deepcopy(saved)
    model.generation_config.eos_token_id = tok.eos_token_id
    try:
        out = generate(model, tok, "What is the capital of France?", max_new_tokens=24)
    finally:
        model.generation_config = saved
    assert out.finish_reason == "eos"
    assert out.token_ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    assert "Paris" in out.text and "<|im_" not in out.text


def test_batched_completion_stops_on_im_end_when_eos_differs(one_thread):
    """generate_greedy / task_completions stop a row at <|im_end|>: one decoding step, not the
    max_new_tokens that stopping on eos alone would run."""
    from datasets import Dataset

    from lora_lab.hf.generate.batch import generate_greedy

    tok = _chatml_base_tokenizer()
    model = _model_that_always_says(tok, "<|im_end|>")
    calls = []
    model.register_forward_hook(lambda m, a, o: calls.append(1))
    prompts = [ll.hf.data.prepare.encode_prompt(tok, p) for p in ("hi", "hello there")]
    assert generate_greedy(model, tok, prompts, max_new_tokens=6) == ["", ""]
    assert len(calls) == 1
    calls.clear()
    rows = Dataset.from_dict({"prompt": ["hi", "hello there"], "response": ["a", "b"]})
    assert ll.task_completions(model, tok, rows, max_new_tokens=6) == ["", ""]
    assert len(calls) == 1
    talker = _model_that_always_says(tok, "a")  # never ends its turn: runs to the limit
    calls.clear()
    talker.register_forward_hook(lambda m, a, o: calls.append(1))
    assert generate_greedy(talker, tok, prompts, max_new_tokens=4) == ["aaaa", "aaaa"]
    assert len(calls) == 4
