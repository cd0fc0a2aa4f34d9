"""Prompt and prefix tuning generate what their training forward predicts.

peft 0.21 + transformers 5.24 ``generate`` gets these adapters wrong (hf/generate/decode.py).  The oracle
is teacher forcing: for greedy decoding, every generated token must be the argmax of ONE forward
pass over prompt + completion at the position before it — the same forward that training uses.
"""

import pytest
import torch

import lora_lab as ll
from lora_lab.hf.data.prepare import encode_prompt
from lora_lab.hf.generate.batch import generate_greedy

PROMPTS = ["copy hello", "upper: abc", "reverse: lora lab", "next: 3 4 5"]


def _adapter(method):
    model, tok = ll.load_model("builtin:tiny", device="cpu")
    model = ll.attach(model, ll.AdapterSpec(method=method, num_virtual_tokens=4))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # an adapter that changes the output (a fresh one may not)
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if method == "prompt" else 0.5))
    return model.eval(), tok


def _teacher_forced_ok(model, prompt_ids, new_ids, eos):
    seq = torch.tensor([prompt_ids + new_ids])
    with torch.no_grad():
        logits = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[0]
    pred = logits[logits.shape[0] - seq.shape[1]:].argmax(-1)  # prompt tuning returns its virtual
    n = len(prompt_ids)                                         # positions' logits first
    want = [int(pred[n - 1 + i]) for i in range(len(new_ids))]
    return want == new_ids, (want, new_ids)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_generation_matches_the_training_forward(method, one_thread):
    model, tok = _adapter(method)
    eos = tok.eos_token_id
    base, _ = ll.load_model("builtin:tiny", device="cpu")
    differs = 0
    for prompt in PROMPTS:
        ids = encode_prompt(tok, prompt)
        res = ll.generate(model, tok, prompt, max_new_tokens=8)
        ok, detail = _teacher_forced_ok(model, ids, list(res.token_ids), eos)
        assert ok, (method, prompt, detail)
        differs += res.text != ll.generate(base, tok, prompt, max_new_tokens=8).text
    assert differs >= 2  # the virtual tokens do change the output, so the check has teeth

    # batched greedy decoding (task_accuracy's path), prompts of mixed lengths, equals one by one
    all_ids = [encode_prompt(tok, p) for p in PROMPTS]
    batched = generate_greedy(model, tok, all_ids, max_new_tokens=8, batch_size=3)
    single = [ll.generate(model, tok, p, max_new_tokens=8).text for p in PROMPTS]
    assert batched == single


def test_sampling_with_prompt_tuning_is_reproducible(one_thread):
    model, tok = _adapter("prompt")
    a = ll.generate(model, tok, PROMPTS[0], greedy=False, temperature=1.0, top_p=0.9, seed=3,
                    max_new_tokens=8)
    b = ll.generate(model, tok, PROMPTS[0], greedy=False, temperature=1.0, top_p=0.9, seed=3,
                    max_new_tokens=8)
    assert a.token_ids == b.token_ids and len(a.token_ids) > 0
