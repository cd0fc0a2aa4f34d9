"""Write a merged full model, W' = W + s·B·A, as sharded safetensors, streamed tensor by tensor.

The folder loads with plain ``transformers.AutoModelForCausalLM.from_pretrained(path)``: no peft,
no bitsandbytes, no lora_lab.  The merge never happens inside the model:

* each weight is read from the model *as it computes with it*.  A 4-bit weight (NF4/FP4, QLoRA §3)
  is dequantized (``bitsandbytes.functional.dequantize_4bit``, or the CPU-packed layout bitsandbytes
  switches to after an eval forward, decoded here from its own codebook and bf16 block scales); an
  int8 weight (LLM.int8()) is ``CB · SCB / 127`` per row.  peft's merge is never called on a
  4-bit layer: on AVX512-BF16 CPUs it reads repacked weights in the wrong layout (PITFALLS.md);
* the adapter's update is added in fp32: ΔW = s·B·A with s = α/r, or α/√r for rsLoRA (peft's
  ``scaling`` dict holds the right one).  DoRA (Liu et al. 2024, §4.1) rescales every output row:
  W' = m ⊙ (W + ΔW) / ‖W + ΔW‖_row;
* the result is cast to the target dtype and goes into the current shard.  A shard is written as soon
  as it is full, so the memory used beyond the loaded model stays near one shard (plus one fp32 copy
  of the largest weight while it is merged).

The model is not changed: no merge, no repacking (the reference forward runs with bitsandbytes' CPU
repacking switched off for its duration), the adapter stays active and unmerged.  With ``check=True``
the written folder is loaded back with ``AutoModelForCausalLM`` (in fp32, on CPU) and its logits on a
few probe sequences are compared with the unmerged adapter model's.

Measured differences (tiny Llama, fp32 export): full-precision or NF4 base 1e-6 relative; fp16 export
about 4e-4 (fp16 rounding); an int8 base about 2e-2, because LLM.int8() inference also quantizes the
activations, which a merged dense model does not.  A 4-bit model that an eval forward already
repacked is exported from the packed weights (bf16 block scales, 2e-3 from the unpacked ones); with
DoRA on such a model peft's own forward is wrong (about 70% off), so its logit check fails.  The
export itself never unpacks (bitsandbytes' inverse of the repacking loses the block-scale layout of
bases quantized without double quantization).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from ..errors import MergeError
from ..hf.model.inspect import is_quantized
from ..hf.model.kbit import dense_weight as _dense
from ..hf.model.kbit import no_repacking as _no_repacking

__all__ = ["export_merged", "MergedExport"]

INDEX = "model.safetensors.index.json"
_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class MergedExport:
    """What :func:`export_merged` wrote, and how close it is to the unmerged adapter model.

    ``files``: every file written, relative to ``path``.  ``total_bytes``: the tensors' bytes on disk.
    ``peak_memory_bytes``: the estimated memory the streaming merge used beyond the loaded model (two
    copies of the largest shard, one being serialised, plus three fp32 copies of the largest weight).
    Logit differences are between the exported model (loaded back from disk) and the unmerged model on
    the probe tokens: ``rel_logit_diff`` = ‖Δlogits‖ / ‖logits‖; None when ``check=False``.
    """

    path: str
    files: tuple[str, ...]
    shards: int
    dtype: str
    adapter: str
    from_quantized: bool
    total_bytes: int
    peak_memory_bytes: int
    max_abs_logit_diff: float | None = None
    mean_abs_logit_diff: float | None = None
    rel_logit_diff: float | None = None

    def __repr__(self) -> str:
        check = ("unchecked" if self.rel_logit_diff is None else
                 f"logits vs unmerged: max abs {self.max_abs_logit_diff:.2e}, mean abs "
                 f"{self.mean_abs_logit_diff:.2e}, rel {self.rel_logit_diff:.2e}")
        source = "dequantized 4/8-bit base" if self.from_quantized else "full-precision base"
        return (f"MergedExport({self.path!r}: adapter {self.adapter!r} merged into a {source}, "
                f"{self.dtype}, {self.shards} shard(s), {self.total_bytes / 2**20:.1f} MiB, peak ≈ "
                f"{self.peak_memory_bytes / 2**20:.1f} MiB beyond the model; {check})")

    def _repr_html_(self) -> str:
        import html

        rows = "".join(f"<tr><th style='text-align:left'>{k}</th><td>{html.escape(str(v))}</td></tr>"
                       for k, v in vars(self).items() if k != "files")
        return f"<table><caption>MergedExport</caption>{rows}</table>"


# ----------------------------------------------------------------------------- arguments
def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise MergeError(f"export_merged got dtype={dtype!r}.",
                     "pass torch.float16, torch.bfloat16 or torch.float32 (or their names)")


def _shard_bytes(size) -> int:
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    text = str(size).strip().upper().replace(" ", "")
    for unit in sorted(_UNITS, key=len, reverse=True):
        if text.endswith(unit) and text[: -len(unit)].replace(".", "", 1).isdigit():
            value = int(float(text[: -len(unit)]) * _UNITS[unit])
            if value > 0:
                return value
    raise MergeError(f"export_merged got max_shard_size={size!r}.",
                     "pass a positive number of bytes or a size such as '500MB' or '2GiB'")


def _adapter_of(model) -> str:
    import peft

    if not isinstance(model, peft.PeftModel):
        raise MergeError(f"export_merged needs a peft model with a LoRA adapter; got "
                         f"{type(model).__name__}.",
                         "attach or load one first: lora_lab.attach(model, AdapterSpec()) or "
                         "lora_lab.load_adapter(model, path); a plain model needs no merge "
                         "(use model.save_pretrained)")
    if not hasattr(model.base_model, "merge_adapter") or not isinstance(
            model.base_model, peft.tuners.lora.LoraModel):
        raise MergeError(f"export_merged merges LoRA adapters (LoRA, rsLoRA, DoRA, QLoRA); this "
                         f"model carries a {model.peft_type} adapter.",
                         "prefix, prompt and IA3 adapters are kept separate: save them with "
                         "lora_lab.save_adapter")
    if getattr(model, "_lora_lab_disabled", False):
        raise MergeError("The adapters of this model are switched off, so there is nothing to merge.",
                         "switch one on first: lora_lab.set_adapter(model, name)")
    active = model.active_adapter
    if isinstance(active, (list, tuple)):
        if len(active) != 1:
            raise MergeError(f"Several adapters are active at once ({list(active)}).",
                             "activate one with lora_lab.set_adapter, or blend them first with "
                             "lora_lab.blend_adapters")
        active = active[0]
    from peft.tuners.lora import LoraLayer

    if any(isinstance(m, LoraLayer) and m.merged for m in model.modules()):
        raise MergeError("Some LoRA layers are merged in place already.",
                         "unmerge first with lora_lab.unmerge_adapter(model), then export")
    return active


def _prepare_folder(path, overwrite: bool) -> Path:
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise MergeError(f"{path} exists and is a file.", "pass a folder path for the model")
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise MergeError(f"{path} exists and is not empty.",
                             "pass a new folder, or overwrite=True to replace the model files in it")
        for old in [*path.glob("model*.safetensors"), path / INDEX]:
            old.unlink(missing_ok=True)
    path.mkdir(parents=True, exist_ok=True)
    return path


# ----------------------------------------------------------------------------- the merge itself
def _merged_weight(layer, adapter: str) -> torch.Tensor:
    """W + s·B·A (or DoRA's row-rescaled version) of one peft LoRA layer, in fp32."""
    base = layer.get_base_layer()
    w = _dense(base, base.weight).float()
    if adapter not in layer.lora_A and adapter not in getattr(layer, "lora_embedding_A", {}):
        return w
    delta = layer.get_delta_weight(adapter).float().to(w.device)
    if delta.shape != w.shape:
        raise MergeError(f"The update of {type(layer).__name__} has shape {tuple(delta.shape)}, "
                         f"its weight {tuple(w.shape)}.", "export_merged supports Linear, "
                         "Embedding and Conv LoRA layers; keep this adapter unmerged")
    merged = w + delta
    if layer.use_dora.get(adapter, False):
        if w.dim() != 2 or layer.fan_in_fan_out:
            raise MergeError(f"DoRA on {type(base).__name__} layers is not supported by export_merged.",
                             "use DoRA on Linear layers only, or keep the adapter unmerged")
        m = layer.lora_magnitude_vector[adapter].weight.float().to(w.device)   # (out,)
        merged = merged * (m / torch.linalg.norm(merged, dim=1)).unsqueeze(1)
    return merged


def _items(model, adapter: str) -> Iterator[tuple[str, tuple, torch.dtype, Callable]]:
    """``(name, shape, source dtype, make)`` for every tensor of the merged model, in model order.

    Names are the plain transformers ones (peft's ``base_layer.`` and wrapper levels removed); a
    tied parameter appears once.
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    seen: set[int] = set()

    def shape_of(p):
        state = getattr(p, "quant_state", None)
        return tuple(state.shape) if type(p).__name__ == "Params4bit" else tuple(p.shape)

    def walk(module, prefix):
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            if getattr(module, "lora_bias", {}).get(adapter, False):
                raise MergeError("The adapter trains a LoRA bias (lora_bias=True).",
                                 "export_merged does not merge LoRA biases; keep it unmerged")
            seen.add(id(base.weight))
            yield (prefix + "weight", shape_of(base.weight), torch.float32,
                   lambda: _merged_weight(module, adapter))
            yield from plain(base, prefix, skip={"weight"})
            return
        if isinstance(module, ModulesToSaveWrapper):
            inner = module.modules_to_save[adapter] if adapter in module.modules_to_save \
                else module.original_module
            yield from walk(inner, prefix)
            return
        if isinstance(module, AuxiliaryTrainingWrapper):
            raise MergeError(f"{prefix.rstrip('.')} is a {type(module).__name__}.",
                             "export_merged merges LoRA layers and modules_to_save only")
        yield from plain(module, prefix)
        for name, child in module.named_children():
            yield from walk(child, f"{prefix}{name}.")

    def plain(module, prefix, skip=frozenset()):
        tensors = [*module.named_parameters(recurse=False),
                   *((n, b) for n, b in module.named_buffers(recurse=False)
                     if n not in module._non_persistent_buffers_set)]
        for name, t in tensors:
            if name in skip or t is None or id(t) in seen:
                continue
            seen.add(id(t))
            dtype = torch.float32 if type(t).__name__ in ("Params4bit", "Int8Params") else t.dtype
            yield prefix + name, shape_of(t), dtype, (lambda m=module, t=t: _dense(m, t))

    yield from walk(model.get_base_model(), "")


def _plan(items, dtype: torch.dtype, limit: int) -> list[list]:
    """Split the items into shards of at most ``limit`` bytes (a larger tensor gets its own)."""
    shards, size = [[]], 0
    for item in items:
        _, shape, src, _ = item
        nbytes = torch.Size(shape).numel() * (dtype.itemsize if src.is_floating_point else src.itemsize)
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((*item, nbytes))
        size += nbytes
    return shards


def _write_shards(shards, dtype: torch.dtype, folder: Path) -> tuple[list[str], dict]:
    from safetensors.torch import save_file

    n = len(shards)
    files, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        fname = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        tensors = {}
        for name, _, _, make, _ in shard:
            t = make()
            t = t.to(dtype) if t.is_floating_point() else t
            tensors[name] = t.detach().to("cpu").contiguous()
            weight_map[name] = fname
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        files.append(fname)
        del tensors
    return files, weight_map


# ----------------------------------------------------------------------------- config, tokenizer
def _write_config(model, folder: Path, dtype: torch.dtype, tokenizer) -> list[str]:
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
        tokenizer = _source_tokenizer(base)
    if tokenizer is not None:
        written += [Path(f).name for f in tokenizer.save_pretrained(folder)]
    return written


def _source_tokenizer(base):
    """The tokenizer saved beside the base model's source folder, if there is one (offline)."""
    from transformers import AutoTokenizer

    from ..hf.model.loading import base_source, resolve_source

    source = base_source(base)
    try:
        path = Path(resolve_source(source))
        if path.is_dir():
            return AutoTokenizer.from_pretrained(path)
    except Exception:  # noqa: BLE001 - a tokenizer is optional here
        return None
    return None


# ----------------------------------------------------------------------------- the check
def _probe_ids(model, n: int = 3, length: int = 24) -> torch.Tensor:
    config = model.get_base_model().config
    length = min(length, getattr(config, "max_position_embeddings", length) or length)
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, config.vocab_size, (n, length), generator=g)


@torch.no_grad()
def _reference_logits(model, ids) -> torch.Tensor:
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with _no_repacking(model):
            return model(input_ids=ids.to(device)).logits.float().cpu()
    finally:
        model.train(was_training)


@torch.no_grad()
def _exported_logits(folder: Path, ids) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    from ..hf.model.loading import _quiet_progress

    with _quiet_progress():
        merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="cpu")
    return merged.eval()(input_ids=ids).logits.float()


# ----------------------------------------------------------------------------- export_merged
def export_merged(model: nn.Module, path, dtype=torch.float16, max_shard_size="500MB", *,
                  tokenizer=None, check: bool = True, overwrite: bool = False,
                  probe_ids: torch.Tensor | None = None) -> MergedExport:
    """Write ``model`` with its active LoRA adapter merged in, as a plain transformers folder.

    ``model``: a peft model from :func:`lora_lab.attach` / :func:`lora_lab.load_adapter`, on a
    full-precision, int8 or 4-bit (NF4/FP4) base.  ``path``: a new or empty folder (``overwrite=True``
    replaces the model files of a used one).  ``dtype``: the stored dtype (fp16 by default; fp32 for
    an exact copy).  ``max_shard_size``: bytes, or ``"500MB"``/``"2GiB"``; a larger model is written
    in several ``model-0000i-of-0000N.safetensors`` shards with ``model.safetensors.index.json``.
    ``tokenizer``: saved beside the model (default: the base's own, when it is a local folder).
    ``check``: reload the folder (in fp32, on CPU: needs the model's memory once more) and compare
    logits with the unmerged model on ``probe_ids`` (default: 3 random sequences of 24 tokens).

    Warns before starting with the estimated peak memory and the size on disk.  Returns a
    :class:`MergedExport`.  For a quantized base the merge is into the dequantized weights the
    adapter was trained against, so the exported model reproduces the QLoRA model, quantization
    error included.
    """
    adapter = _adapter_of(model)
    target = _dtype(dtype)
    limit = _shard_bytes(max_shard_size)
    shards = _plan(_items(model, adapter), target, limit)
    folder = _prepare_folder(path, overwrite)
    ids = probe_ids if probe_ids is not None else _probe_ids(model)
    ref = _reference_logits(model, ids) if check else None
    total = sum(item[-1] for shard in shards for item in shard)
    biggest_shard = max(sum(item[-1] for item in shard) for shard in shards)
    biggest_tensor = max(torch.Size(item[1]).numel() for shard in shards for item in shard)
    peak = 2 * biggest_shard + 3 * 4 * biggest_tensor
    warnings.warn(f"export_merged: writing {total / 2**20:.1f} MiB in {len(shards)} shard(s) to "
                  f"{folder}; the merge needs about {peak / 2**20:.1f} MiB of memory beyond the "
                  "loaded model" + (" (the check then loads the exported model once more in fp32)"
                                    if check else ""), stacklevel=2)
    with torch.no_grad():
        files, weight_map = _write_shards(shards, target, folder)
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        files.append(INDEX)
    files = _write_config(model, folder, target, tokenizer) + files
    diffs = {}
    if check:
        diff = _exported_logits(folder, ids) - ref
        diffs = dict(max_abs_logit_diff=float(diff.abs().max()),
                     mean_abs_logit_diff=float(diff.abs().mean()),
                     rel_logit_diff=float(diff.norm() / ref.norm().clamp_min(1e-12)))
    return MergedExport(path=os.fspath(folder), files=tuple(dict.fromkeys(files)),
                        shards=len(shards), dtype=str(target).removeprefix("torch."),
                        adapter=adapter, from_quantized=is_quantized(model), total_bytes=total,
                        peak_memory_bytes=peak, **diffs)
