"""What can be adapted in a model, and what an adapter costs.

``inspect_model`` lists the linear layers an adapter can target (the LM head is left out, as peft's
``"all-linear"`` leaves it out); ``count_parameters`` counts trainable and total parameters exactly,
including 4-bit weights, whose packed storage holds two parameters per byte.  ``is_quantized`` and
``resolve_targets`` are facts about the model that the planner and ``attach`` both ask.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    import pandas as pd

from ...errors import TargetModuleError
from ...specs import AdapterSpec
from .._peft import base_of, is_peft, strip_prefix

__all__ = ["ParameterCount", "count_parameters", "inspect_model", "is_quantized", "layer_index",
           "linear_modules", "module_type", "resolve_targets"]

_LAYER_RE = re.compile(r"\.(?:layers|h|blocks|layer|decoder\.layers)\.(\d+)\.")
OUTPUT_NAMES = ("lm_head", "embed_out", "output_projection")


def layer_index(name: str) -> int | None:
    """The decoder-layer index in a module name (``model.layers.3.mlp.up_proj`` -> 3)."""
    m = _LAYER_RE.search(f".{name}.")
    return int(m.group(1)) if m else None


def module_type(name: str) -> str:
    """The target name peft matches on: the last component (``...self_attn.q_proj`` -> ``q_proj``)."""
    return name.rsplit(".", 1)[-1]


def linear_kind(module: nn.Module) -> str | None:
    cls = type(module).__name__
    if cls in ("Linear4bit", "Linear8bitLt"):
        return cls
    if isinstance(module, nn.Linear):
        return "Linear"
    if cls == "Conv1D":  # GPT-2 style: weight stored (in, out), "fan_in_fan_out"
        return "Conv1D"
    return None


def base_layer(module: nn.Module):
    """For a peft-wrapped layer return its base layer; else the module itself."""
    get_base = getattr(module, "get_base_layer", None)
    return get_base() if callable(get_base) else module


def layer_features(module: nn.Module, kind: str) -> tuple[int, int]:
    if kind == "Conv1D":
        fan_in, fan_out = module.weight.shape
        return int(fan_in), int(fan_out)
    return int(module.in_features), int(module.out_features)


def linear_modules(model: nn.Module):
    """Yield ``(name, base_module, kind)`` for each adaptable linear layer, skipping the LM head and
    the adapters' own layers (``lora_A``/``lora_B``)."""
    skip_prefixes: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in skip_prefixes):
            continue
        base = base_layer(module)
        kind = linear_kind(base)
        if base is not module and kind is not None:  # a peft wrapper: report it, skip its insides
            skip_prefixes.append(name + ".")
        if kind is None or module_type(name) in OUTPUT_NAMES:
            continue
        if module_type(name) in ("base_layer",) or ".lora_" in name or ".ia3_" in name:
            continue
        yield strip_prefix(name), base, kind


COLUMNS = ("name", "module_type", "layer", "kind", "in_features", "out_features", "params", "dtype",
           "quantized")


def module_rows(model: nn.Module) -> list[dict]:
    """:func:`inspect_model`'s rows as plain dicts (no pandas: attach() and training use these)."""
    rows = []
    for name, mod, kind in linear_modules(model):
        fin, fout = layer_features(mod, kind)
        bias = getattr(mod, "bias", None)
        rows.append({
            "name": name, "module_type": module_type(name), "layer": layer_index(name),
            "kind": kind, "in_features": fin, "out_features": fout,
            "params": fin * fout + (bias.numel() if bias is not None else 0),
            "dtype": str(mod.weight.dtype).replace("torch.", ""),
            "quantized": kind in ("Linear4bit", "Linear8bitLt"),
        })
    return rows


def inspect_model(model: nn.Module) -> pd.DataFrame:
    """A table of the adaptable linear modules.

    Columns: ``name``, ``module_type`` (q_proj, ..., down_proj: what ``target_modules`` matches),
    ``layer`` (decoder layer index or None), ``kind`` (Linear, Linear4bit, Linear8bitLt, Conv1D),
    ``in_features``, ``out_features``, ``params`` (in·out + bias), ``dtype`` (storage dtype) and
    ``quantized``.  Group by ``module_type`` to see what a target name selects.
    """
    import pandas as pd  # here, not at import: 67 MiB of RSS that attach() and training skip

    df = pd.DataFrame(module_rows(model), columns=list(COLUMNS))
    df["layer"] = df["layer"].astype("Int64")
    return df


def _logical_numel(p: torch.Tensor) -> int:
    """Parameters a tensor represents: a packed 4-bit ``Params4bit`` holds 2 per byte."""
    qs = getattr(p, "quant_state", None)
    if qs is not None and getattr(qs, "shape", None) is not None:
        return int(torch.Size(qs.shape).numel())
    return p.numel()


@dataclass(frozen=True)
class ParameterCount:
    """Trainable and total parameters, and the adapter's size on disk (safetensors, bytes).

    ``has_adapter`` is False for a model without adapters: its trainable parameters are the base
    model's own (all of them for a freshly loaded model: full fine-tuning), and ``adapter_bytes``
    is 0.  ``adapter_mib`` is in MiB (2²⁰ bytes), ``adapter_mb`` in MB (10⁶ bytes).
    """

    trainable: int
    total: int
    adapter_bytes: int
    has_adapter: bool = True

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    @property
    def adapter_mb(self) -> float:
        return self.adapter_bytes / 1e6

    @property
    def adapter_mib(self) -> float:
        return self.adapter_bytes / 2**20

    @property
    def what(self) -> str:
        """``"adapter file 1.23 MiB"``, or what is trained when there is no adapter."""
        if self.has_adapter:
            return f"adapter file {self.adapter_mib:.2f} MiB"
        if self.trainable == 0:
            return "no adapter, nothing trainable"
        if self.trainable == self.total:
            return "no adapter: the full model is trainable (full fine-tuning)"
        return "no adapter: these are the base model's own trainable parameters"

    def __repr__(self) -> str:
        return (f"ParameterCount(trainable={self.trainable:,}, total={self.total:,}, "
                f"percent={self.percent:.4f}%, {self.what})")

    def _repr_html_(self) -> str:
        return ("<table><tr><th>trainable</th><th>total</th><th>trainable %</th>"
                "<th>adapter</th></tr>"
                f"<tr><td>{self.trainable:,}</td><td>{self.total:,}</td>"
                f"<td>{self.percent:.4f}%</td><td>{self.what}</td></tr></table>")


def count_parameters(model: nn.Module) -> ParameterCount:
    """Exact trainable and total parameter counts.

    For LoRA each adapted ``in → out`` module adds ``r·(in + out)`` trainable parameters (A is r×in,
    B is out×r).  ``adapter_bytes`` is the payload peft writes to ``adapter_model.safetensors``: the
    trainable tensors in their dtype (the file adds a small JSON header).  A model without adapters
    (not wrapped by peft) has no adapter file: ``has_adapter=False`` and ``adapter_bytes=0``.
    """
    adapter = is_peft(model)
    trainable = total = nbytes = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = _logical_numel(p)
        total += n
        if p.requires_grad:
            trainable += n
            nbytes += p.numel() * p.element_size()
    return ParameterCount(trainable=trainable, total=total, adapter_bytes=nbytes if adapter else 0,
                          has_adapter=adapter)


def is_quantized(model: nn.Module) -> bool:
    """True when the base weights are stored by bitsandbytes (4-bit or 8-bit)."""
    base = base_of(model)
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False)
                or getattr(base, "is_quantized", False))


def resolve_targets(model: nn.Module, spec: AdapterSpec) -> list[str]:
    """The module-type names ``spec`` targets on ``model`` (``"all-linear"`` made explicit), after
    checking that they exist, that ``layers`` are in range and that ``r <= min(in, out)``."""
    table = module_rows(model)
    have = sorted({r["module_type"] for r in table})
    if not table:
        raise TargetModuleError("The model has no linear layers an adapter could target.",
                                "load a causal language model with lora_lab.load_model()")
    if spec.target_modules == "all-linear":
        targets = list(dict.fromkeys(r["module_type"] for r in table))
    else:
        targets = list(spec.target_modules)
        missing = [t for t in targets if t not in have]
        if missing:
            raise TargetModuleError(
                f"AdapterSpec.target_modules names {missing}, which this model does not have.",
                f"choose from the module types it has: {have} (or 'all-linear')")
    layers = sorted({r["layer"] for r in table if r["layer"] is not None})
    if spec.layers is not None:
        bad = [i for i in spec.layers if i not in layers]
        if bad:
            raise TargetModuleError(
                f"AdapterSpec.layers asks for layers {bad}, but the model has layers "
                f"0..{layers[-1] if layers else -1}.",
                f"pass layers within 0..{layers[-1] if layers else -1}, or layers=None for all")
    sel = [r for r in table if r["module_type"] in targets
           and (spec.layers is None or r["layer"] in spec.layers)]
    if spec.method == "lora" and sel:
        smallest = min(min(r["in_features"], r["out_features"]) for r in sel)
        if spec.r > smallest:
            raise TargetModuleError(
                f"AdapterSpec.r = {spec.r} is larger than the smallest targeted dimension "
                f"({smallest}), so the update could never have that rank.",
                f"pass r <= {smallest}")
    return targets
