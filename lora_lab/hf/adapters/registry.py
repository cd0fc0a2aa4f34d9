"""The adapters loaded on one model: list them (one row each) and delete one."""

from __future__ import annotations

import pandas as pd
from torch import nn

from ...errors import AdapterError
from .._peft import is_peft, require_adapter, require_peft
from .switch import active_adapter

__all__ = ["adapter_sizes", "delete_adapter", "list_adapters"]


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` and free its weights."""
    model = require_peft(model)
    require_adapter(model, name)
    if len(model.peft_config) == 1:
        raise AdapterError(f"{name!r} is the model's only adapter; peft cannot delete the last one.",
                           "use model.get_base_model() for the bare base, or attach another first")
    model.delete_adapter(name)
    for attr in ("lora_lab_specs", "lora_lab_sources"):
        d = dict(getattr(model, attr, {}))
        d.pop(name, None)
        setattr(model, attr, d)


def adapter_sizes(model: nn.Module) -> dict[str, dict[str, int]]:
    """Per adapter: ``modules`` (layers holding it: one ``lora_A`` or ``ia3_l`` each), ``params``
    and ``bytes`` (numel × element size) of exactly the tensors its saved file holds, read from
    peft's own per-adapter state dict.  (Matching parameter names instead miscounts an adapter
    named like a module: "mlp" would take every ``….mlp.…`` weight of a Llama.)"""
    from peft import get_peft_model_state_dict

    out = {}
    for name in getattr(model, "peft_config", {}):
        state = get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers=False)
        out[name] = {"modules": sum(".lora_A." in k or "ia3_l" in k for k in state),
                     "params": sum(t.numel() for t in state.values()),
                     "bytes": sum(t.numel() * t.element_size() for t in state.values())}
    return out


def list_adapters(model: nn.Module) -> pd.DataFrame:
    """One row per adapter: method, rank, alpha, targets, modules, parameters, active, source."""
    cols = ["name", "method", "r", "alpha", "targets", "modules", "params", "active", "source"]
    if not is_peft(model):
        return pd.DataFrame(columns=cols)
    active = active_adapter(model)
    specs = getattr(model, "lora_lab_specs", {})
    sources = getattr(model, "lora_lab_sources", {})
    sizes = adapter_sizes(model)
    rows = []
    for name, cfg in model.peft_config.items():
        spec = specs.get(name)
        targets = getattr(cfg, "target_modules", None)
        rows.append({
            "name": name, "method": _method_name(cfg, spec), "r": getattr(cfg, "r", None),
            "alpha": getattr(cfg, "lora_alpha", None),
            "targets": ",".join(sorted(targets)) if isinstance(targets, (set, list)) else targets,
            "modules": sizes[name]["modules"], "params": sizes[name]["params"],
            "active": name == active,
            "source": sources.get(name, ""),
        })
    return pd.DataFrame(rows, columns=cols)


def _method_name(cfg, spec) -> str:
    kind = str(cfg.peft_type).split(".")[-1].lower()
    if kind == "lora":
        if getattr(cfg, "use_dora", False):
            return "dora"
        return "rslora" if getattr(cfg, "use_rslora", False) else "lora"
    return {"prefix_tuning": "prefix", "prompt_tuning": "prompt"}.get(kind, kind)
