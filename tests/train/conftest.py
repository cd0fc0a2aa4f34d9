"""Fixtures for the training tests: a LoRA'd tiny Llama and small tokenized data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def attach_lora(model, r: int = 8, seed: int = 0):
    """``lora_lab.attach`` with LoRA r on all linear layers, its init seeded."""
    import lora_lab as ll

    try:
        attach = ll.attach
    except ImportError:  # the public name maps to a module that may still be landing
        from lora_lab.hf.adapters.attach import attach
    torch.manual_seed(seed)
    return attach(model, ll.AdapterSpec(r=r, target_modules="all-linear"))


def token_rows(tokenizer, n: int = 16) -> list[dict]:
    """Tokenized rows of periodic text ("abcabc...", "xyzxyz..."): the next character is fixed by
    the current one, so even a LoRA on a random tiny model learns it fast.  labels = input_ids."""
    patterns = ["abc", "xyz"]
    rows = []
    for i in range(n):
        text = (patterns[i % len(patterns)] * 20)[i % 3:][:36]
        ids = tokenizer(text)["input_ids"]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)})
    return rows


def assert_half_bases_refused(model_dir, tok, rows, spec, short: str):
    """A base loaded in ``short`` ("bf16", "fp16") and a 4-bit base computing in it each warn at load
    ("native <short>") and are refused by train() before any step, the fix naming dtype='auto' and
    the QuantSpec's compute dtype; the chip check must be made to say "emulated" first.  Returns the
    last (4-bit) model, with an adapter."""
    import lora_lab as ll
    from lora_lab.train.loop import train

    long = {"bf16": "bfloat16", "fp16": "float16"}[short]
    for quant, dtype in ((None, short), (ll.QuantSpec(compute_dtype=long), None)):
        with pytest.warns(UserWarning, match=f"native {short}"):
            model, _ = ll.load_model(model_dir, quant, device="cpu", dtype=dtype)
        model = ll.attach(model, ll.AdapterSpec(r=4, target_modules="all-linear"))
        with pytest.raises(ll.TrainingError, match=f"multiply in {short}") as err:
            train(model, tok, rows, spec=spec)
        assert "dtype='auto'" in err.value.fix and f"compute_dtype='{long}'" in err.value.fix
        assert not list(Path(spec.output_dir).glob("checkpoint-*"))   # refused before any step
    return model


def response_rows(tok, lengths) -> list[dict]:
    """Tokenized rows "question i → response" with the prompt masked (-100) and a random response
    of ``lengths[i]`` tokens: rows whose supervised-token counts differ."""
    rows = []
    for i, n in enumerate(lengths):
        prompt = tok(f"question {i}: say something")["input_ids"]
        g = torch.Generator().manual_seed(i)
        response = torch.randint(10, len(tok) - 1, (n,), generator=g).tolist()
        rows.append({"input_ids": prompt + response, "attention_mask": [1] * (len(prompt) + n),
                     "labels": [-100] * len(prompt) + response})
    return rows


@pytest.fixture
def lora_tiny(tiny_llama):
    model, tok = tiny_llama
    return attach_lora(model), tok


@pytest.fixture
def rows(tiny_llama):
    return token_rows(tiny_llama[1])


@pytest.fixture
def fresh_lora(tiny_llama_dir):
    """A factory: a freshly loaded tiny Llama with the same seeded LoRA each call."""
    import lora_lab as ll

    def make(seed: int = 0):
        model, tok = ll.load_model(tiny_llama_dir, device="cpu")
        return attach_lora(model, seed=seed), tok

    return make
