"""Load a base model and its tokenizer: from a builtin name, a local folder or a hub id.

All three go through the same ``from_pretrained`` code, so quantization, dtype and device handling are
identical whichever the source.  Quantization uses bitsandbytes through
``transformers.BitsAndBytesConfig``: int8 (LLM.int8()), or 4-bit NF4/FP4 (QLoRA), which also runs on
x86 CPUs.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import torch

from ...errors import ModelLoadError
from ...specs import QuantSpec
from .._peft import base_of
from .builtin import builtin_names, is_builtin, resolve_builtin
from .device import (
    as_dtype,
    auto_dtype,
    default_compute_dtype,
    default_device,
    dtype_name,
    emulated_dtypes,
    emulated_half_weights,
)
from .lm_head import keep_head_input_contiguous

__all__ = ["load_model", "bnb_config", "resolve_source", "base_source", "quiet_progress"]


def bnb_config(quant: QuantSpec, device: str, dtype: torch.dtype | None = None):
    """The ``transformers.BitsAndBytesConfig`` for ``quant`` on ``device``.

    The 4-bit layers' compute dtype (what a block is dequantized to before its matrix product) is
    ``quant.compute_dtype`` when given, else ``dtype``, else the device's default (fp32 on a CPU,
    bf16 or fp16 on a GPU).  :func:`load_model` passes as ``dtype`` the dtype asked for, or, when
    none was, the "auto" rule's (:func:`~lora_lab.hf.model.device.auto_dtype`: bf16 on a CPU with
    native bf16 for a model of hidden size >= 512, where bitsandbytes' 4-bit matmul then runs at
    about 1.4x its fp32 speed on SmolLM2-135M; fp32 on other CPUs)."""
    from transformers import BitsAndBytesConfig

    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = as_dtype(quant.compute_dtype) or dtype or default_compute_dtype(device)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=torch.uint8,
    )


def resolve_source(source, dtype=None, *, config_only: bool = False) -> str:
    """A builtin name becomes its local folder (``builtin:smollm2``'s in ``dtype``, converted once;
    with ``config_only``, any dtype already cached); a folder or hub id is returned as is."""
    if is_builtin(source):
        return str(resolve_builtin(source, dtype, config_only=config_only))
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str) or not source:
        raise ModelLoadError(f"load_model got source={source!r}, which is not a model name.",
                             f"pass a hub id, a local folder, or one of {builtin_names()}")
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"The folder {path} has no config.json, so it is not a saved model.",
                                 "pass the folder written by save_pretrained()")
        return str(path)
    looks_local = source.startswith((".", "/", "~")) or source.count("/") > 1
    if looks_local:
        raise ModelLoadError(f"The folder {source!r} does not exist.",
                             f"check the path, or use one of {builtin_names()}")
    return source


def base_source(model) -> str:
    """Where ``model``'s base (a peft model's too) was loaded from: the source lora_lab recorded
    in :func:`load_model`, else transformers' ``config._name_or_path`` ("" when unknown)."""
    base = base_of(model)
    return getattr(base, "lora_lab_source", None) or getattr(base.config, "_name_or_path", "")


@contextlib.contextmanager
def quiet_progress():
    """Hide transformers' per-tensor "Loading weights" bar for small models (it is noise there)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _is_auto(dtype) -> bool:
    return isinstance(dtype, str) and dtype.lower() == "auto"


def _hidden_size(source) -> int | None:
    """``hidden_size`` from ``source``'s config.json (None when it has none), read without the
    weights: ``dtype="auto"`` picks bf16 on a CPU only for models wide enough to gain from it."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(resolve_source(source, config_only=True))
    except (OSError, ValueError):  # offline hub id, custom code: decide by the chip alone
        return None
    return getattr(config, "hidden_size", None)


def load_model(source, quant=None, *, device: str | None = None, dtype=None,
               trust_remote_code: bool = False):
    """Load ``(model, tokenizer)``.

    Parameters
    ----------
    source: a builtin name (``"builtin:tiny"``, ``"builtin:tiny-random"``, ``"builtin:smollm2"``: a
        real 135 M-parameter chat model, offline), a local folder written by ``save_pretrained``, or a
        hub id such as ``"HuggingFaceTB/SmolLM2-135M-Instruct"``.
    quant: ``None`` (full precision), a :class:`~lora_lab.QuantSpec`, or ``"nf4"``, ``"fp4"``,
        ``"int8"``.
    device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``; ``None`` picks CUDA when there is one.
    dtype: weight dtype of the unquantized parts (``"fp32"``, ``"bf16"``, ``"fp16"``, a
        ``torch.dtype``); ``None`` means the device default (fp32 on CPU, bf16/fp16 on GPU);
        ``"auto"`` is bf16 on a CPU with native bf16 (AVX512-BF16, AMX, Arm BF16) for a model of
        hidden size >= 512 (half the memory of the frozen base, and what
        ``TrainSpec(precision="auto")`` computes in there), else the device default.  With
        ``quant`` and no ``QuantSpec.compute_dtype``, the 4-bit layers compute in this dtype
        when one is given, and by the "auto" rule when none is (bf16 on a bf16 CPU for a model
        of hidden size >= 512, the unquantized parts staying fp32; ``dtype="fp32"`` forces fp32:
        :func:`bnb_config`).
    trust_remote_code: off unless you trust the repository's Python code.

    The tokenizer always has a pad token (the EOS token when the model defines none).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quant = QuantSpec.parse(quant)
    device = device or default_device()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device={device!r} was asked for, but no CUDA GPU is visible.",
                             "pass device='cpu' (or None to choose automatically)")
    asked = dtype
    dtype = as_dtype(dtype, device, _hidden_size(source) if _is_auto(dtype) else None) \
        or default_compute_dtype(device)
    # builtin:smollm2 is read from the folder cached in `dtype` (a quantized load too: a bf16 source
    # halves the memory its quantization passes through), so nothing is converted at load time.
    path = resolve_source(source, dtype)
    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code, device_map=device)
    if quant is not None:
        # the 4-bit matmuls compute in the dtype asked for, else by the "auto" rule (while the
        # unquantized parts stay in the device default): on a bf16 CPU, bf16 for wide models
        compute = dtype if asked is not None else auto_dtype(device, _hidden_size(source))
        kwargs["quantization_config"] = bnb_config(quant, device, compute)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        with quiet_progress():
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise ModelLoadError(
            f"Could not load {source!r}: {str(exc).splitlines()[0]}",
            f"with no network, pass a local folder or a builtin name ({', '.join(builtin_names())}); "
            "for a hub id, check the spelling and that you are online") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if quant is not None:  # bitsandbytes' CPU repacking is lossy and breaks training (hf/model/kbit.py)
        from .kbit import keep_4bit_layout

        keep_4bit_layout(model)
    slow = emulated_half_weights(model) if device == "cpu" else []
    if slow:  # loads (inspection, scans and spectra are fine), but train() refuses it
        dtype = slow[0][1]
        warnings.warn(f"load_model({str(source)!r}): its layers multiply in {dtype_name(dtype)}, and "
                      f"{emulated_dtypes()[dtype]}; training refuses it. Load with dtype='auto' (fp32 on "
                      "this CPU) instead.", stacklevel=2)
    keep_head_input_contiguous(model)  # batched generation in bf16 on a CPU (hf/model/lm_head.py)
    model.lora_lab_source = str(source)
    model.lora_lab_quant = quant
    return model, tokenizer
