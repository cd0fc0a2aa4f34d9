"""The builtin offline models: ``builtin:tiny`` (pretrained), ``builtin:tiny-random`` and
``builtin:smollm2`` (a real language model, SmolLM2-135M-Instruct: see :mod:`.smollm2`).

``builtin:tiny`` is a small **pretrained** Llama-architecture causal LM (``LlamaForCausalLM``), made by
this project and shipped as package data (``lora_lab/assets/tiny``), so every lesson has a base model
whose weights mean something, with no network.

What it is
    1.01 M parameters: hidden 128, 4 decoder layers, 4 query / 2 key-value heads of width 32 (GQA),
    SwiGLU MLP of width 512, RoPE, RMSNorm, untied input/output embeddings.  Its modules carry the
    names of real LLMs (``q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj``), so a LoRA
    recipe written for it carries over to Llama, Qwen or SmolLM.  Stored in fp32 (4.0 MB of
    safetensors); :func:`lora_lab.load_model` loads it in about 0.1 s on CPU (0.3 s in NF4), after
    the imports.  The tokenizer is character level (100 ids: printable ASCII, newline and
    ``<pad> <s> </s> <unk>``) with a chat template: ``<s>Q: {prompt}\nA: {response}</s>``.

How it was made
    ``scripts/pretrain_builtin.py`` trains it from seed 0 on CPU: 1,500 AdamW steps of 128 examples
    (4.07 M tokens, about 0.34 CPU-seconds per step, so about 10 minutes on one free core) on a
    synthetic corpus that the script generates: two-digit addition (``12+34`` → ``46``), copying a
    word (``copy HeLlo``), the length of a word (``len abcd`` → ``4``), counting
    (``count 3 6`` → ``3 4 5 6``), the first/last letter of a word and the larger of two numbers.
    Every example is written in the chat template and learned as a plain causal LM; prompts of the
    held-out ``"test"`` split (see :mod:`lora_lab.hf.data.tasks`) were never trained on.
    ``assets/tiny/card.json`` records the seed, steps, tokens, wall time and held-out accuracy per
    skill (:func:`builtin_card`); ``python scripts/pretrain_builtin.py --check`` retrains and compares.

What it can and cannot do
    Held-out greedy exact-match accuracy: copy, len, first, last 100%, count and max 98%, two-digit
    addition only 57% (wrong on 71% of sums with a carry out of the units, 28% of those without,
    often by one in the last digit): 93% over the mix.  It has never seen the builtin
    fine-tuning tasks (:func:`lora_lab.builtin_tasks`: next, wrap, upper, subtract, reverse, sort)
    and scores 0-1% on each until a LoRA teaches it.  It knows no language, facts or code, and its
    context is short strings (trained on sequences of at most about 40 tokens).  It is a model for teaching
    and testing LoRA, not a chatbot.  Its trained weights are heavier-tailed than random ones (excess
    kurtosis up to 4.5 in the last ``down_proj``, against 0.0), so per-layer NF4 error varies
    (0.0905-0.0996 relative) where ``tiny-random``'s is flat (0.0916-0.0928).

``builtin:tiny-random`` has the same config and tokenizer with seeded random weights; compare the two
to see what training does to weights (e.g. per-layer quantization error and kurtosis).

Contract used by :func:`lora_lab.load_model`: :func:`resolve_builtin` maps a builtin name to a local
folder that ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ...errors import ModelLoadError
from . import smollm2

PREFIX = "builtin:"
ASSETS = Path(__file__).resolve().parents[2] / "assets"
TOKENIZER_DIR = ASSETS / "tokenizer"
_RANDOM_VERSION = "v2"  # v2: hidden 128 and the chat-template tokenizer

__all__ = ["PREFIX", "builtin_names", "is_builtin", "resolve_builtin", "builtin_config", "builtin_card"]


def builtin_names() -> list[str]:
    """The builtin model names that :func:`lora_lab.load_model` accepts (``builtin:smollm2`` only
    where its package is installed: see :mod:`lora_lab.hf.model.smollm2`)."""
    names = ["builtin:tiny-random"]
    if (ASSETS / "tiny" / "config.json").exists():
        names.insert(0, "builtin:tiny")
    if smollm2.available():
        names.append(smollm2.NAME)
    return names


def is_builtin(source) -> bool:
    return isinstance(source, str) and source.startswith(PREFIX)


def cache_dir() -> Path:
    """Where generated builtin folders live: ``$LORA_LAB_CACHE`` or ``~/.cache/lora_lab``."""
    root = os.environ.get("LORA_LAB_CACHE") or Path.home() / ".cache" / "lora_lab"
    return Path(root)


def builtin_card(name: str = "builtin:tiny") -> dict:
    """How ``builtin:tiny`` was made: seed, steps, tokens, wall time, held-out accuracy per skill."""
    import json

    short = name[len(PREFIX):] if name.startswith(PREFIX) else name
    card = ASSETS / short / "card.json"
    if short != "tiny" or not card.exists():
        raise ModelLoadError(f"There is no model card for {name!r}.",
                             "only 'builtin:tiny' has one (run scripts/pretrain_builtin.py to make it)")
    return json.loads(card.read_text())


def builtin_config():
    """The ``LlamaConfig`` shared by the builtin models (hidden 128, 4 layers, GQA 4/2 heads)."""
    from transformers import AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )


def _materialise_random(target: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(builtin_config())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a crash leaves no half-written model folder
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():
            raise


def resolve_builtin(name: str, dtype=None, *, config_only: bool = False) -> Path:
    """The local folder holding builtin model ``name`` (``"builtin:tiny"`` or ``"tiny"``).

    ``dtype`` matters only for ``builtin:smollm2``, which is cached once per dtype (fp32 by default);
    with ``config_only`` any cached dtype will do (only its ``config.json`` will be read).
    """
    short = name[len(PREFIX):] if name.startswith(PREFIX) else name
    if short == "smollm2":
        if config_only:
            return smollm2.config_folder(cache_dir())
        return smollm2.smollm2_folder(cache_dir(), dtype)
    if short == "tiny" and (ASSETS / "tiny" / "config.json").exists():
        return ASSETS / "tiny"
    if short == "tiny-random":
        target = cache_dir() / "builtin" / f"tiny-random-{_RANDOM_VERSION}"
        if not (target / "config.json").exists():
            _materialise_random(target)
        return target
    raise ModelLoadError(f"There is no builtin model called {name!r}.",
                         f"use one of {builtin_names()}")
