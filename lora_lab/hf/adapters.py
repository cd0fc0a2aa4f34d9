"""Several adapters on one base model: add, list, switch, disable, delete, merge.

Switching is peft's ``set_adapter`` on weights that are already loaded: no reload, no re-merge
(about a millisecond on a small model).  ``set_adapter(model, None)`` turns every adapter off, so the
model computes exactly the base model; :func:`disabled_adapters` does the same for a ``with`` block.
"""

from __future__ import annotations

import contextlib

import pandas as pd
from torch import nn

from ..errors import AdapterError
from .adapter_io import load_adapter, read_adapter_spec, save_adapter
from .attach import attach
from .merge import MergeReport, merge_adapter, merged_copy, unmerge_adapter

__all__ = ["attach", "save_adapter", "load_adapter", "read_adapter_spec", "list_adapters",
           "set_adapter", "active_adapter", "delete_adapter", "disabled_adapters", "merge_adapter",
           "unmerge_adapter", "merged_copy", "MergeReport"]


def _peft(model):
    import peft

    if not isinstance(model, peft.PeftModel):
        raise AdapterError("This model has no adapters yet.",
                           "attach one with lora_lab.attach(model, spec) or lora_lab.load_adapter")
    return model


def _check_name(model, name: str) -> None:
    if name not in model.peft_config:
        raise AdapterError(f"There is no adapter named {name!r}.",
                           f"pass one of {sorted(model.peft_config)}")


def active_adapter(model: nn.Module) -> str | None:
    """The active adapter's name, or None when adapters are switched off (or there are none)."""
    import peft

    if not isinstance(model, peft.PeftModel) or getattr(model, "_lora_lab_disabled", False):
        return None
    active = model.active_adapter
    return active[0] if isinstance(active, (list, tuple)) else active


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Make ``name`` the active adapter, or pass None to run the plain base model."""
    model = _peft(model)
    tuner = model.base_model
    if name is None:
        if not hasattr(tuner, "disable_adapter_layers"):
            raise AdapterError("Prefix and prompt tuning cannot be switched off persistently.",
                               "use `with lora_lab.disabled_adapters(model):` around the call")
        tuner.disable_adapter_layers()
        model._lora_lab_disabled = True
        return
    _check_name(model, name)
    if getattr(model, "_lora_lab_disabled", False):
        tuner.enable_adapter_layers()
        model._lora_lab_disabled = False
    model.set_adapter(name)


@contextlib.contextmanager
def disabled_adapters(model: nn.Module):
    """``with disabled_adapters(model): ...`` runs the base model exactly, then restores adapters."""
    model = _peft(model)
    with model.disable_adapter():
        yield model


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` and free its weights."""
    model = _peft(model)
    _check_name(model, name)
    if len(model.peft_config) == 1:
        raise AdapterError(f"{name!r} is the model's only adapter; peft cannot delete the last one.",
                           "use model.get_base_model() for the bare base, or attach another first")
    model.delete_adapter(name)
    for attr in ("lora_lab_specs", "lora_lab_sources"):
        d = dict(getattr(model, attr, {}))
        d.pop(name, None)
        setattr(model, attr, d)


def list_adapters(model: nn.Module) -> pd.DataFrame:
    """One row per adapter: method, rank, alpha, targets, modules, parameters, active, source."""
    import peft

    cols = ["name", "method", "r", "alpha", "targets", "modules", "params", "active", "source"]
    if not isinstance(model, peft.PeftModel):
        return pd.DataFrame(columns=cols)
    active = active_adapter(model)
    specs = getattr(model, "lora_lab_specs", {})
    sources = getattr(model, "lora_lab_sources", {})
    rows = []
    for name, cfg in model.peft_config.items():
        n_mod = n_par = 0
        for mod_name, p in model.named_parameters():
            if f".{name}." in f"{mod_name}." or mod_name.endswith(f".{name}"):
                n_par += p.numel()
                n_mod += ".lora_A." in mod_name or ".ia3_l." in mod_name
        spec = specs.get(name)
        targets = getattr(cfg, "target_modules", None)
        rows.append({
            "name": name, "method": _method_name(cfg, spec), "r": getattr(cfg, "r", None),
            "alpha": getattr(cfg, "lora_alpha", None),
            "targets": ",".join(sorted(targets)) if isinstance(targets, (set, list)) else targets,
            "modules": n_mod, "params": n_par, "active": name == active,
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
