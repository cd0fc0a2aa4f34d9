"""A streaming scan of a checkpoint's quantization error: one row per linear weight × scheme.

Sources: a loaded model, a state dict, a ``.safetensors`` file, a checkpoint folder or a sharded
checkpoint (index json).  Files are read one tensor at a time with ``safetensors.safe_open``, so
peak memory is about the largest tensor, not the model.  The per-weight math is
:func:`lora_lab.hf.quant.roundtrip.quant_error`.  Rows come in model order whatever the source
(safetensors lists its keys alphabetically: layer 10 before layer 2, down_proj before q_proj): by
layer number, then q, k, v, o, gate, up, down (:data:`lora_lab.core.quant.MODULE_ORDER`).

What a scan measures is the error of the *weights*.  ``int8`` is LLM.int8(), the weights of
``load_model(quant="int8")`` (one absmax per row); at run time that model also rounds each layer's
inputs to int8 (columns holding a value above 6.0 kept unrounded), an error no weight scan can see:
on SmolLM2-135M the weights alone move the logits by a KL of ~0.006 nats per token, the real int8
model by ~0.05.  :func:`lora_lab.hf.quant.output.quantized_output_error` runs the real LLM.int8()
matmul and gets the latter.

Weights that already went through a 4-bit format (a GGUF Q4_0/Q4_1/Q4_K checkpoint converted back
to fp32) hold at most 16 distinct values per 32; the ``levels_per_32`` column counts them and
``QuantScan.note`` says so.  Their re-quantization error measures the fit to the old grid, not to
the model: on a Q4_1-rounded SmolLM2, NF4 shows a lower weight error than FP4 on all 210 layers
but moves the logits more (KL ~1.4 vs ~0.8 nats).  Compare schemes on logits there.

Device: in-memory weights are analysed where they lie.  Streamed tensors are loaded to ``cuda``
when ``torch.cuda.is_available()``, else to the CPU (bitsandbytes runs on both).
"""

from __future__ import annotations

import html
import json
import os
import re
import struct
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ...core.quant import (
    MODULE_ORDER,
    QuantError,
    bits_per_param,
    canonical_scheme,
    error_metrics,
    levels_per_block,
    weight_stats,
)
from ...errors import LoraLabError
from .._peft import strip_prefix
from .roundtrip import roundtrip, stored_settings

__all__ = [
    "INT8_NOTE",
    "PREQUANT_NOTE",
    "QuantScan",
    "clean_name",
    "layer_and_module",
    "linear_weight_names",
    "model_order",
    "module_items",
    "scan_quantization",
    "weight_loaders",
]

_SKIP = re.compile(r"(embed|norm|lm_head|^wte$|^wpe$|^ln_|^ln\d|lora_)")


# ------------------------------------------------------------------ which tensors -------------
def clean_name(name: str) -> str:
    """Drop peft's wrappers so names match the checkpoint: base_model.model.X.base_layer.weight."""
    name = strip_prefix(name)
    return name.replace(".base_layer.", ".")


def _is_linear_weight(name: str, ndim: int) -> bool:
    parts = name.split(".")
    return (ndim == 2 and parts[-1] == "weight"
            and not any(_SKIP.search(p.lower()) for p in parts[:-1]))


def linear_weight_names(names_and_ndims: Mapping[str, int]) -> list[str]:
    """The names scanned: 2-D tensors named ``*.weight``, except embeddings, ``lm_head``, norms
    and LoRA factors."""
    return [n for n, d in names_and_ndims.items() if _is_linear_weight(clean_name(n), d)]


def layer_and_module(name: str) -> tuple[int | None, str]:
    """``model.layers.3.self_attn.q_proj.weight`` -> (3, "q_proj")."""
    parts = name.split(".")
    layer = next((int(p) for p in parts if p.isdigit()), None)
    return layer, parts[-2] if len(parts) > 1 else name


def model_order(names: Sequence[str]) -> list[str]:
    """``names`` sorted as models list them: by layer number (names with none first), then by
    module type in :data:`~lora_lab.core.quant.MODULE_ORDER`; other names keep their order."""
    def key(name: str) -> tuple[int, int]:
        layer, module = layer_and_module(name)
        rank = MODULE_ORDER.index(module) if module in MODULE_ORDER else len(MODULE_ORDER)
        return (-1 if layer is None else layer, rank)

    return sorted(names, key=key)


# ------------------------------------------------------------------ sources -------------------
Item = tuple[str, Callable[[], torch.Tensor]]


def module_items(model: torch.nn.Module) -> list[Item]:
    items = []
    for name, p in model.named_parameters():
        kind = type(p).__name__
        if kind in ("Params4bit", "Int8Params") or (p.ndim == 2 and not p.is_floating_point()):
            src = getattr(model, "lora_lab_source", None)
            raise LoraLabError(
                f"The model is already quantized ({name} is a {kind} of dtype {p.dtype}), so its "
                "full-precision weights are gone and the error cannot be measured.",
                "scan the full-precision model: "
                + (f"scan_quantization({src!r}) streams its checkpoint" if src else
                   "load it with ll.load_model(source) (no quant=), or pass the checkpoint folder"))
        clean = clean_name(name)
        if _is_linear_weight(clean, p.ndim):
            items.append((clean, (lambda p=p: p.detach())))
    return items


def _shards(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix != ".safetensors":
            raise LoraLabError(f"{path} is not a .safetensors file.",
                               "pass a .safetensors file or a folder written by save_pretrained")
        return [path]
    if not path.is_dir():
        raise LoraLabError(f"{path} does not exist.", "check the path to the checkpoint")
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise LoraLabError(f"{index} is not a valid safetensors index ({exc}).",
                               "re-save the checkpoint with save_pretrained") from exc
        return [path / s for s in dict.fromkeys(weight_map.values())]
    files = [path / "model.safetensors"] if (path / "model.safetensors").exists() else \
        sorted(path.glob("*.safetensors"))
    if not files:
        raise LoraLabError(f"{path} holds no .safetensors file (lora_lab never unpickles .bin).",
                           "convert the checkpoint with save_pretrained(safe_serialization=True)")
    return files


def _diagnose(path: Path, exc: Exception) -> LoraLabError:
    """Name the file and, from the header, the first tensor whose bytes lie past the end."""
    size = path.stat().st_size if path.exists() else 0
    where = ""
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n)) if 0 < n <= size - 8 else None
        if header:
            data = size - 8 - n
            cut = [k for k, v in header.items()
                   if k != "__metadata__" and v["data_offsets"][1] > data]
            if cut:
                where = (f"; tensor {cut[0]!r} needs bytes up to {header[cut[0]]['data_offsets'][1]}"
                         f" but the data section holds {data}")
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        where = "; its header cannot be read"
    return LoraLabError(f"{path} is corrupt or truncated ({exc}){where}.",
                        "download or save the checkpoint again (an interrupted copy leaves a "
                        "truncated file)")


def _file_items(path: Path, device: str) -> list[Item]:
    from safetensors import SafetensorError, safe_open

    def load(file: Path, key: str) -> torch.Tensor:
        # open per tensor: the file is mmapped, and pages read stay in RSS while it is open
        try:
            with safe_open(file, framework="pt", device=device) as f:
                return f.get_tensor(key)
        except SafetensorError as exc:
            raise LoraLabError(f"{file}: tensor {key!r} could not be read ({exc}).",
                               "the file is corrupt: save or download it again") from exc

    items = []
    for file in _shards(path):
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                shapes = {k: len(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        except (SafetensorError, OSError) as exc:
            raise _diagnose(file, exc) from exc
        items += [(k, (lambda file=file, k=k: load(file, k))) for k in linear_weight_names(shapes)]
    return items


def weight_loaders(source) -> dict:
    """``{name: () -> Tensor}`` for every linear weight of ``source`` (a model, a state dict, a
    .safetensors file or a checkpoint folder); each tensor is read only when its loader is called."""
    return dict(_items(source)[0])


def _items(source) -> tuple[list[Item], str]:
    items, label = _source_items(source)
    order = {n: i for i, n in enumerate(model_order([n for n, _ in items]))}
    return sorted(items, key=lambda item: order[item[0]]), label


def _source_items(source) -> tuple[list[Item], str]:
    if isinstance(source, torch.nn.Module):
        return module_items(source), type(source).__name__
    if isinstance(source, Mapping):
        names = linear_weight_names({k: v.ndim for k, v in source.items()})
        return [(k, (lambda v=source[k]: v)) for k in names], "state dict"
    if isinstance(source, (str, os.PathLike)):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        path = Path(source).expanduser()
        return _file_items(path, device), str(path)
    raise LoraLabError(f"scan_quantization got source of type {type(source).__name__}.",
                       "pass a loaded model, a state dict, a .safetensors file or a checkpoint folder")


# ------------------------------------------------------------------ the scan ------------------
PREQUANT_LEVELS = 16
PREQUANT_NOTE = (
    "These weights are already rounded to a 4-bit grid (≤ 16 distinct values per 32, as in a GGUF "
    "Q4 checkpoint): re-quantization errors measure the fit to that grid, not to the model, and can "
    "rank schemes opposite to their effect on the logits. Compare schemes with "
    "quantized_output_error.")
INT8_NOTE = (
    "int8 is LLM.int8(), as load_model(quant='int8'): its weight error is shown; at run time it "
    "also rounds layer inputs to int8 (quantized_output_error measures both).")


@dataclass(frozen=True, eq=False)
class QuantScan:
    """Result of :func:`scan_quantization`.

    ``table``: one row per linear weight × scheme (name, layer, module, out_features, in_features,
    numel, then the :class:`QuantError` fields).  ``summary``: one row per scheme (size in MiB,
    2²⁰ bytes, at bits_per_param, size saved against fp16, mean/max relative error, the worst tensor).
    ``interrupted`` is True when a KeyboardInterrupt stopped the scan: the rows finished before it
    are kept, ``n_done`` of ``n_total`` tensors were fully scanned, and a ``RuntimeWarning`` says so.
    ``note``: what to keep in mind when reading the errors ("" when nothing): weights already
    rounded to a 4-bit grid, and LLM.int8()'s run-time error on inputs (see the module docstring);
    ``caveats`` the same as ``{short label: explanation}``.
    """

    table: object
    summary: object
    source: str
    schemes: tuple[str, ...]
    blocksize: int
    double_quant: bool
    n_total: int
    n_done: int
    interrupted: bool = False

    @property
    def prequantized(self) -> bool:
        """True when the median weight holds ≤ 16 distinct values per 32 (already 4-bit rounded)."""
        levels = self.table.drop_duplicates("name")["levels_per_32"] if len(self.table) else []
        return len(levels) > 0 and float(levels.median()) <= PREQUANT_LEVELS

    @property
    def caveats(self) -> dict[str, str]:
        """What to keep in mind when reading the errors: ``{short label: explanation}`` (figures
        show the labels, ``note`` the explanations)."""
        out = {}
        if self.prequantized:
            out["⚠ weights already on a 4-bit grid: compare schemes on logits"] = PREQUANT_NOTE
        if "int8" in self.schemes:
            out["int8 = LLM.int8(): weight error only"] = INT8_NOTE
        return out

    @property
    def note(self) -> str:
        return " ".join(self.caveats.values())

    def __repr__(self) -> str:
        state = " INTERRUPTED" if self.interrupted else ""
        lines = [(f"QuantScan({self.source}: {self.n_done}/{self.n_total} tensors, "
                 f"schemes={list(self.schemes)}, blocksize={self.blocksize}, "
                 f"double_quant={self.double_quant}{state})")]
        if len(self.summary):
            lines.append(self.summary.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
        if self.note:
            lines.append("note: " + self.note)
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        head = repr(self).splitlines()[0]
        note = f"<p><b>note:</b> {html.escape(self.note)}</p>" if self.note else ""
        return (f"<p><code>{head}</code></p>" + note
                + self.summary.to_html(index=False, float_format="%.4g"))


_COLUMNS = ["name", "layer", "module", "out_features", "in_features", "numel", "scheme", "blocksize",
            "double_quant", "rel_error", "mean_abs_error", "max_abs_error", "snr_db",
            "outlier_share", "bits_per_param", "levels_per_32"]


def _summary(table):
    import pandas as pd

    if table.empty:
        return pd.DataFrame(columns=["scheme", "tensors", "params", "size_mb", "fp16_mb",
                                     "saved_mb", "mean_rel_error", "max_rel_error", "worst"])
    rows = []
    for scheme, g in table.groupby("scheme", sort=False):
        params = int(g.numel.sum())
        size = float((g.numel * g.bits_per_param).sum()) / 8 / 2**20
        worst = g.loc[g.rel_error.idxmax()]
        rows.append({"scheme": scheme, "tensors": len(g), "params": params, "size_mb": size,
                     "fp16_mb": params * 2 / 2**20, "saved_mb": params * 2 / 2**20 - size,
                     "mean_rel_error": float(g.rel_error.mean()),
                     "max_rel_error": float(worst.rel_error), "worst": worst["name"]})
    return pd.DataFrame(rows)


def _row(name: str, w: torch.Tensor, err: QuantError, levels: float) -> dict:
    layer, module = layer_and_module(name)
    d = err.to_dict()
    d.pop("shape")
    return dict(name=name, layer=layer, module=module, out_features=w.shape[0],
                in_features=w.shape[1], numel=w.numel(), **d, levels_per_32=levels)


def scan_quantization(source, schemes: Sequence[str] = ("nf4", "fp4", "int8"), blocksize: int = 64,
                      double_quant: bool = False, progress: bool = True,
                      callback: Callable[[dict], None] | None = None) -> QuantScan:
    """Quantization error of every linear weight of ``source``, for each scheme.

    ``source``: a loaded full-precision model (an already quantized one is refused: its original
    weights are gone), a state dict, a ``.safetensors`` file, a checkpoint folder, or a sharded
    checkpoint folder (``model.safetensors.index.json``).  Files are streamed one tensor at a time.
    Linear weights are 2-D ``*.weight`` tensors other than embeddings, ``lm_head`` and norms.
    Rows come in model order (layer number, then q, k, v, o, gate, up, down).

    ``schemes``: from :data:`~lora_lab.core.quant.SCHEMES`.  ``int8`` is LLM.int8(), the weights
    ``load_model(quant="int8")`` stores (one absmax per row: its rows show ``blocksize`` = the row
    length and no double quantization); ``int8-blockwise`` is bitsandbytes' blockwise 8-bit.
    The errors are those of the weights; read the module docstring (and ``result.note``) for what
    they do not show: LLM.int8()'s run-time rounding of inputs, and weights already 4-bit rounded.

    ``progress`` shows a tqdm bar (a widget in notebooks).  ``callback(row)`` is called after each
    row is added (the row is kept even if the callback raises).  Ctrl-C / "interrupt kernel"
    (KeyboardInterrupt) ends the scan early: the finished rows are returned with
    ``interrupted=True`` and a ``RuntimeWarning`` is issued; any other exception propagates.

    Memory: one tensor, its Q(W) and ~1M-value temporaries at a time: peak RSS growth measured at
    1.5× the largest tensor's fp32 size (benchmarks/quant_scan.py).
    """
    import pandas as pd
    from tqdm.auto import tqdm

    schemes = tuple(dict.fromkeys(canonical_scheme(s) for s in schemes))
    trips = {s: roundtrip(s, blocksize, double_quant) for s in schemes}
    items, label = _items(source)
    rows, done, interrupted = [], 0, False
    bar = tqdm(total=len(items), desc="quant scan", unit="tensor", disable=not progress)
    try:
        for name, load in items:
            w = load()
            stats, levels = weight_stats(w), levels_per_block(w)
            for s in schemes:
                bs, dq = stored_settings(s, blocksize, double_quant, tuple(w.shape))
                bits = bits_per_param(s, bs, dq, w.numel())
                err = error_metrics(w, trips[s](w), scheme=s, blocksize=bs, double_quant=dq,
                                    stats=stats, bits=bits)
                rows.append(_row(name, w, err, levels))
                if callback is not None:
                    callback(rows[-1])
            done += 1
            bar.update(1)
            del w
    except KeyboardInterrupt:
        interrupted = True
        warnings.warn(f"scan_quantization was interrupted after {done} of {len(items)} tensors; "
                      "the result keeps the finished rows (result.interrupted is True).",
                      RuntimeWarning, stacklevel=2)
    finally:
        bar.close()
    table = pd.DataFrame(rows, columns=_COLUMNS)
    table["layer"] = table["layer"].astype("Int64")
    return QuantScan(table=table, summary=_summary(table), source=label, schemes=schemes,
                     blocksize=blocksize, double_quant=double_quant, n_total=len(items),
                     n_done=done, interrupted=interrupted)
