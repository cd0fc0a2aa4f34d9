"""The arguments of :func:`~lora_lab.hf.model.plan.estimate_memory`, checked and resolved the way
:func:`lora_lab.train` resolves them: the device's memory, the compute dtype, and whether the loss
is chunked.  A bad value is a :class:`~lora_lab.errors.SpecError` that names the fix."""

from __future__ import annotations

import os
from dataclasses import fields

from ...core import memory as mem
from ...errors import SpecError
from ...specs import PRECISIONS, AdapterSpec, DataSpec, QuantSpec, TrainSpec
from .device import default_train_precision

__all__ = ["PROMPT_LEARNING", "SEQ_LEN_DEFAULT", "TRAIN_DEFAULTS", "check_args", "planned_loss_chunk",
           "resolve_device", "resolve_precision", "system_ram_bytes"]

# The defaults of a training run, read from TrainSpec's and DataSpec's fields, so that an estimate
# with no arguments is the memory of lora_lab.train with no arguments.
TRAIN_DEFAULTS = {f.name: f.default for f in fields(TrainSpec)}
SEQ_LEN_DEFAULT = next(f.default for f in fields(DataSpec) if f.name == "max_length")
_DTYPE_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
PROMPT_LEARNING = ("prefix", "prompt")   # methods the chunked loss cannot train (peft adds their tokens)


def check_args(batch_size, seq_len, optimizer, precision, grad_accum):
    for name, v in (("batch_size", batch_size), ("seq_len", seq_len), ("grad_accum", grad_accum)):
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            raise SpecError("estimate_memory", name, v, f"{name} must be an integer >= 1",
                            f"pass {name}={TRAIN_DEFAULTS.get(name, SEQ_LEN_DEFAULT)}")
    if optimizer not in mem.OPTIMIZERS:
        raise SpecError("estimate_memory", "optimizer", optimizer,
                        f"choose one of {mem.OPTIMIZERS}", "pass optimizer='adamw'")
    if precision not in PRECISIONS:
        raise SpecError("estimate_memory", "precision", precision, f"choose one of {PRECISIONS}",
                        "pass precision='auto' (fp16 on a T4, bf16 on other GPUs and on CPUs with "
                        "native bf16 for models of hidden size >= 512, else fp32)")


def system_ram_bytes() -> int:
    """The machine's total RAM in bytes (psutil when installed, else ``os.sysconf``)."""
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def resolve_device(device):
    cpu = isinstance(device, str) and device.strip().lower() == "cpu"
    try:
        return mem.device_bytes(device, system_ram_bytes() if cpu else None)
    except (ValueError, OSError, AttributeError) as exc:   # no sysconf: not a POSIX system
        choices = {k.lower(): v for k, v in mem.AMBIGUOUS_DEVICES.items()}.get(
            str(device).strip().lower())
        fix = (" or ".join(f"pass device={c!r}" for c in choices) if choices else
               f"pass one of {[*mem.DEVICES, 'cpu']} or the memory in GiB, such as device=24")
        raise SpecError("estimate_memory", "device", device, str(exc), fix) from exc


def resolve_precision(precision: str, q: QuantSpec | None, dev_label: str,
                      hidden: int | None = None) -> tuple[str, int]:
    """``(name, bytes)`` of the compute dtype: ``precision``, else the quantization's compute dtype,
    else the device's, as :func:`lora_lab.train` and ``load_model(dtype="auto")`` pick it: fp16 on a
    T4, bf16 on other GPUs, and on this machine's CPU the rule of
    :func:`~lora_lab.hf.model.device.default_train_precision` (bf16 where the chip has native bf16
    and the model's hidden size is >= 512, else fp32)."""
    if precision == "auto":
        if q is not None and q.compute_dtype is not None:
            precision = _DTYPE_NAMES[q.compute_dtype]
        elif dev_label == mem.CPU:
            precision = default_train_precision("cpu", hidden)
        else:
            precision = "fp16" if dev_label == "T4" else "bf16"
    if precision == "fp16" and dev_label == mem.CPU:
        raise SpecError("estimate_memory", "precision", "fp16", "fp16 training needs a CUDA GPU",
                        "pass precision='auto' (bf16 or fp32 on the CPU, by what the chip has) or "
                        "'bf16'")
    return precision, 4 if precision == "fp32" else 2


def planned_loss_chunk(chunked_loss, *, chunk_size, vocab: int, adapter: AdapterSpec | None = None):
    """Tokens per chunk of the loss ``lora_lab.train`` will run, or None for the full loss:
    ``TrainSpec.chunked_loss``'s rule (``"auto"``: on from a 32k vocabulary).  With ``adapter`` a
    prefix or prompt tuning spec, ``"auto"`` is the full loss and True is refused, as in training
    (peft adds their virtual tokens in its own forward, which the chunked loss bypasses)."""
    if not (isinstance(chunked_loss, bool) or chunked_loss == "auto"):
        raise SpecError("estimate_memory", "chunked_loss", chunked_loss,
                        "chunked_loss must be True, False or 'auto'", "pass chunked_loss='auto'")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise SpecError("estimate_memory", "loss_chunk_size", chunk_size,
                        "loss_chunk_size must be a positive number of tokens",
                        f"pass loss_chunk_size={TRAIN_DEFAULTS['loss_chunk_size']} (it need not divide the "
                        "sequence length)")
    if adapter is not None and adapter.method in PROMPT_LEARNING:
        if chunked_loss is True:
            raise SpecError("estimate_memory", "chunked_loss", True,
                            f"{adapter.method} tuning adds virtual tokens in peft's forward, which the "
                            "chunked loss bypasses, so training refuses it", "pass chunked_loss='auto'")
        return None
    return mem.resolve_loss_chunk(chunked_loss, vocab, chunk_size)
