"""A plain transformers model folder, written piece by piece, and read back.

A folder that ``transformers.AutoModelForCausalLM.from_pretrained(path)`` loads holds:

* the weights as safetensors: one ``model.safetensors``, or shards
  ``model-0000i-of-0000N.safetensors`` beside ``model.safetensors.index.json`` (the index maps every
  tensor name to its shard).  :func:`write_shard` writes one file from a ``{name: tensor}`` dict, so
  a caller that builds the tensors shard by shard never holds more than one shard;
* ``config.json`` (and ``generation_config.json``), with the quantization settings removed so that
  the folder loads as a dense model in the dtype it is stored in (:func:`write_config`);
* the tokenizer's files, when there is a tokenizer (:func:`source_tokenizer` finds the one saved
  beside a locally loaded base).

:func:`load_saved` reads such a folder back, in fp32 on the CPU: the reference for a logit check.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch
from torch import nn

__all__ = ["write_shard", "write_config", "source_tokenizer", "load_saved"]


def write_shard(tensors: dict[str, torch.Tensor], file: Path) -> None:
    """Write ``{name: tensor}`` (CPU, contiguous) to one safetensors ``file``, marked as PyTorch
    weights (``{"format": "pt"}``, which transformers expects)."""
    from safetensors.torch import save_file

    save_file(tensors, str(file), metadata={"format": "pt"})


def write_config(model: nn.Module, folder: Path, dtype: torch.dtype, tokenizer=None) -> list[str]:
    """Write the config, generation config and tokenizer of ``model``'s base into ``folder``, for a
    dense model stored in ``dtype``; returns the file names written.

    The config is a copy without ``quantization_config`` (the stored weights are dense), with
    ``dtype`` and ``architectures`` set for the base's class.  ``tokenizer``: saved as given; when
    None, the tokenizer beside the base's source folder if there is one (:func:`source_tokenizer`)."""
    base = model.get_base_model()
    config = copy.deepcopy(base.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            with contextlib.suppress(AttributeError):
                delattr(config, attr)
    config.dtype = dtype
    config.architectures = [type(base).__name__]
    config.save_pretrained(folder)
    written = ["config.json"]
    gen = getattr(base, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(folder)
        written.append("generation_config.json")
    if tokenizer is None:
        tokenizer = source_tokenizer(base)
    if tokenizer is not None:
        written += [Path(f).name for f in tokenizer.save_pretrained(folder)]
    return written


def source_tokenizer(base: nn.Module):
    """The tokenizer saved beside the base model's source folder, if there is one (offline: a hub
    id or a folder without a tokenizer gives None)."""
    from transformers import AutoTokenizer

    from .loading import base_source, resolve_source

    source = base_source(base)
    try:
        path = Path(resolve_source(source))
        if path.is_dir():
            return AutoTokenizer.from_pretrained(path)
    except Exception:  # noqa: BLE001 - a tokenizer is optional here
        return None
    return None


def load_saved(folder: Path) -> nn.Module:
    """The causal LM saved in ``folder``, loaded with plain transformers in fp32 on the CPU (the
    model's memory once more), in eval mode."""
    from transformers import AutoModelForCausalLM

    from .loading import quiet_progress

    with quiet_progress():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="cpu")
    return model.eval()
