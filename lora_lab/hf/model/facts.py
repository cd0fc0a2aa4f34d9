"""What the memory planner needs to know about a model, without loading its weights.

:func:`load_config` reads a ``PretrainedConfig`` from whatever names a model (a loaded model, a
config, a folder, a builtin name, a hub id: only ``config.json`` is fetched).  :func:`model_facts`
instantiates that config on PyTorch's ``meta`` device (shapes, no storage), so an 8B or 70B config
costs no more RAM than the imports, and returns :class:`ModelFacts`: the architecture numbers of
:class:`lora_lab.core.memory.Architecture`, the exact parameter count and the table of adaptable
linear layers (:func:`~lora_lab.inspect_model` of the meta model).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from ...core import memory as mem
from ...errors import ModelLoadError
from .._peft import base_of
from .inspect import inspect_model

__all__ = ["ModelFacts", "load_config", "model_facts"]


def load_config(model):
    """A ``PretrainedConfig`` from a loaded model, a config, a local folder, a builtin name or a
    hub id (only ``config.json`` is fetched, through ``AutoConfig``)."""
    from transformers import AutoConfig, PretrainedConfig

    from .loading import resolve_source

    if isinstance(model, PretrainedConfig):
        return model
    if isinstance(model, torch.nn.Module):
        base = base_of(model)
        if getattr(base, "config", None) is None:
            raise ModelLoadError(f"{type(model).__name__} has no .config, so its shapes are unknown.",
                                 "pass a transformers model, its config, a folder or a hub id")
        return base.config
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    path = resolve_source(model, config_only=True)
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        where = "folder" if Path(path).exists() else "hub id"
        raise ModelLoadError(f"Could not read the config of {model!r} ({where}): "
                             f"{str(exc).splitlines()[0]}",
                             "offline, pass a local folder with a config.json, a builtin name, or "
                             "a transformers config object (e.g. LlamaConfig(...))") from exc


@dataclass(frozen=True, eq=False)
class ModelFacts:
    """What the planner needs from a model, read once from its meta-device instance."""

    name: str
    model_type: str
    arch: mem.Architecture
    total_params: int
    table: pd.DataFrame          # inspect_model() of the meta model
    meta_model: torch.nn.Module  # shapes only: no storage
    bias_params: int
    resolved: dict = field(default_factory=dict, repr=False)  # (method, targets, layers) -> names

    @property
    def linear_params(self) -> int:
        return int(self.table["params"].sum())

    @property
    def unquantized_params(self) -> int:
        """Parameters bitsandbytes leaves in floating point: embeddings, LM head, norms."""
        return self.total_params - int((self.table["in_features"] * self.table["out_features"]).sum())

    @property
    def quant_shapes(self) -> tuple[tuple[int, int], ...]:
        return tuple(zip(self.table["out_features"].tolist(), self.table["in_features"].tolist()))

    @property
    def layer_count(self) -> int:
        return self.arch.layers


def _arch(cfg) -> mem.Architecture:
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    h = int(cfg.hidden_size)
    heads = int(cfg.num_attention_heads)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or h // heads)
    inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * h
    return mem.Architecture(hidden=h, intermediate=int(inter), layers=int(cfg.num_hidden_layers),
                            heads=heads, kv_heads=kv, head_dim=head_dim, vocab=int(cfg.vocab_size),
                            tied_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)))


_CACHE: OrderedDict[str, ModelFacts] = OrderedDict()


def model_facts(model) -> ModelFacts:
    """:class:`ModelFacts` for ``model`` (anything :func:`load_config` takes); cached per config."""
    from transformers import AutoModelForCausalLM

    cfg = load_config(model)
    key = cfg.to_json_string()
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    try:
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(cfg)
    except (ValueError, KeyError) as exc:
        raise ModelLoadError(f"transformers cannot build a causal LM from this config "
                             f"({type(cfg).__name__}): {str(exc).splitlines()[0]}",
                             "pass the config of a causal language model") from exc
    total = sum(p.numel() for p in meta.parameters())
    bias = sum(p.numel() for n, p in meta.named_parameters() if n.endswith(".bias"))
    name = getattr(cfg, "name_or_path", "") or cfg.model_type
    facts = ModelFacts(name=name, model_type=cfg.model_type, arch=_arch(cfg), total_params=total,
                       table=inspect_model(meta), meta_model=meta, bias_params=bias)
    _CACHE[key] = facts
    while len(_CACHE) > 8:
        _CACHE.popitem(last=False)
    return facts
