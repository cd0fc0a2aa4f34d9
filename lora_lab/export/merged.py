"""Write a merged full model, W' = W + s·B·A, as sharded safetensors, streamed tensor by tensor.

The folder loads with plain ``transformers.AutoModelForCausalLM.from_pretrained(path)``: no peft,
no bitsandbytes, no lora_lab.  The merge never happens inside the model.  This module plans and
orchestrates; the pieces that touch peft, safetensors and transformers live in ``hf/``:

1. :func:`~lora_lab.hf.adapters.merged_weights.merged_items` lists every tensor of the merged model
   as ``(name, shape, source dtype, make)``.  ``make()`` reads the weight *as the model computes with
   it* (a 4-bit NF4/FP4 or int8 base is dequantized, never merged in its packed form, which on
   AVX512-BF16 CPUs bitsandbytes has repacked into a layout peft's merge misreads)
   and adds the adapter's update in fp32: ΔW = s·B·A with s = α/r (α/√r for rsLoRA), or DoRA's
   row rescaling W' = m ⊙ (W + ΔW) / ‖W + ΔW‖_row (Liu et al. 2024, §4.1);
2. :func:`_plan` cuts that list into shards of at most ``max_shard_size`` bytes in the target dtype;
3. each shard's tensors are made, cast to the target dtype and written
   (:func:`~lora_lab.hf.model.save.write_shard`) as soon as the shard is full, so the memory used
   beyond the loaded model stays near one shard (plus one fp32 copy of the largest weight while it
   is merged); then the index, config and tokenizer (:func:`~lora_lab.hf.model.save.write_config`).

The model is not changed: no merge, no repacking (the reference forward runs with bitsandbytes' CPU
repacking switched off for its duration), the adapter stays active and unmerged.  With ``check=True``
the written folder is loaded back with ``AutoModelForCausalLM`` (in fp32, on CPU) and its logits on a
few probe sequences are compared with the unmerged adapter model's, by the one logit check of
:mod:`lora_lab.hf.adapters.merge` (:func:`~lora_lab.hf.adapters.merge.logit_gap`).

Measured differences (tiny Llama, fp32 export): full-precision or NF4 base 1e-6 relative; fp16 export
about 4e-4 (fp16 rounding); an int8 base about 2e-2, because LLM.int8() inference also quantizes the
activations, which a merged dense model does not.  A 4-bit model that an eval forward already
repacked is exported from the packed weights (bf16 block scales, 2e-3 from the unpacked ones); with
DoRA on such a model peft's own forward is wrong (about 70% off), so its logit check fails.  The
export itself never unpacks (bitsandbytes' inverse of the repacking loses the block-scale layout of
bases quantized without double quantization).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import MergeError
from ..hf.adapters.merge import logit_gap, make_probe_ids, probe_logits
from ..hf.adapters.merged_weights import mergeable_adapter, merged_items
from ..hf.model.inspect import is_quantized
from ..hf.model.save import load_saved, write_config, write_shard

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
    """The stored dtype: fp16, bf16 or fp32, given as a torch dtype or a name (``"bf16"``)."""
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise MergeError(f"export_merged got dtype={dtype!r}.",
                     "pass torch.float16, torch.bfloat16 or torch.float32 (or their names)")


def _shard_bytes(size) -> int:
    """A shard size in bytes, from an int or a text such as ``"500MB"`` (10**6) or ``"2GiB"`` (2**30)."""
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


def _prepare_folder(path, overwrite: bool) -> Path:
    """A new or empty folder at ``path``; ``overwrite`` clears the model files of a used one (and
    only those: other files stay)."""
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


# ----------------------------------------------------------------------------- shards
def _plan(items, dtype: torch.dtype, limit: int) -> list[list]:
    """Split the items into shards of at most ``limit`` bytes (a larger tensor gets its own).

    Each item ``(name, shape, source dtype, make)`` comes back with its size in the stored dtype
    appended: floating tensors take ``dtype``'s size, integer ones keep their own."""
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
    """Make, cast and write each shard in turn (one shard's tensors in memory at a time); returns
    the file names and the ``{tensor name: file name}`` map of the index."""
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
        write_shard(tensors, folder / fname)
        files.append(fname)
        del tensors
    return files, weight_map


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
    adapter = mergeable_adapter(model)
    target = _dtype(dtype)
    limit = _shard_bytes(max_shard_size)
    shards = _plan(merged_items(model, adapter), target, limit)
    folder = _prepare_folder(path, overwrite)
    ids = probe_ids if probe_ids is not None else make_probe_ids(model, n=3, length=24)
    ref = probe_logits(model, ids) if check else None
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
    files = write_config(model, folder, target, tokenizer) + files
    diffs = {}
    if check:
        gap = logit_gap(ref, probe_logits(load_saved(folder), ids))
        diffs = dict(max_abs_logit_diff=gap.max_abs, mean_abs_logit_diff=gap.mean_abs,
                     rel_logit_diff=gap.rel)
    return MergedExport(path=os.fspath(folder), files=tuple(dict.fromkeys(files)),
                        shards=len(shards), dtype=str(target).removeprefix("torch."),
                        adapter=adapter, from_quantized=is_quantized(model), total_bytes=total,
                        peak_memory_bytes=peak, **diffs)
