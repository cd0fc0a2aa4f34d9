"""The builtin offline models: ``builtin:tiny`` and ``builtin:tiny-random``.

Both are small Llama-architecture causal LMs (``LlamaForCausalLM``) with the module names of real
LLMs (``q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj``), so a lesson learned on them
carries over to Llama, Qwen or SmolLM.  They load with no network: the tokenizer is package data
under ``lora_lab/assets/tokenizer`` (character level), and ``tiny-random`` is materialised once, from a
seed, into a local cache folder that ``from_pretrained`` then reads like any checkpoint.

Contract used by :func:`lora_lab.load_model`: :func:`resolve_builtin` maps a builtin name to a local
folder that ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..errors import ModelLoadError

PREFIX = "builtin:"
ASSETS = Path(__file__).resolve().parent.parent / "assets"
TOKENIZER_DIR = ASSETS / "tokenizer"
_RANDOM_VERSION = "v1"

__all__ = ["PREFIX", "builtin_names", "is_builtin", "resolve_builtin", "builtin_config"]


def builtin_names() -> list[str]:
    """The builtin model names that :func:`lora_lab.load_model` accepts."""
    names = ["builtin:tiny-random"]
    if (ASSETS / "tiny" / "config.json").exists():
        names.insert(0, "builtin:tiny")
    return names


def is_builtin(source) -> bool:
    return isinstance(source, str) and source.startswith(PREFIX)


def cache_dir() -> Path:
    """Where generated builtin folders live: ``$LORA_LAB_CACHE`` or ``~/.cache/lora_lab``."""
    root = os.environ.get("LORA_LAB_CACHE") or Path.home() / ".cache" / "lora_lab"
    return Path(root)


def builtin_config():
    """The ``LlamaConfig`` shared by the builtin models (hidden 256, 4 layers, GQA 4/2 heads)."""
    from transformers import AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=256,
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


def resolve_builtin(name: str) -> Path:
    """The local folder holding builtin model ``name`` (``"builtin:tiny"`` or ``"tiny"``)."""
    short = name[len(PREFIX):] if name.startswith(PREFIX) else name
    if short == "tiny" and (ASSETS / "tiny" / "config.json").exists():
        return ASSETS / "tiny"
    if short == "tiny-random":
        target = cache_dir() / "builtin" / f"tiny-random-{_RANDOM_VERSION}"
        if not (target / "config.json").exists():
            _materialise_random(target)
        return target
    raise ModelLoadError(f"There is no builtin model called {name!r}.",
                         f"use one of {builtin_names()}")
