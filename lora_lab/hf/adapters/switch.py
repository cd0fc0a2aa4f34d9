"""Switch between the adapters loaded on one base model, or switch them all off.

Switching works on weights that are already loaded: no reload, no re-merge.  :func:`switch_adapter`
re-routes the adapter layers directly (about 0.1–0.3 ms on a small model; peft's own
``set_adapter`` walks the module tree and costs milliseconds, see PITFALLS.md);
:func:`set_adapter` is peft's path, used where the fast one does not apply (merged layers, prompt
learning, ``modules_to_save``).  ``None`` means the base model: every adapter off, so the model
computes exactly the base.  :func:`disabled_adapters` does the same for a ``with`` block, and
:class:`using_adapter` switches for one call and back (generation uses it).
"""

from __future__ import annotations

import contextlib

from torch import nn

from ...errors import AdapterError
from .._peft import active_name, is_peft, require_adapter, require_peft

__all__ = ["set_adapter", "switch_adapter", "active_adapter", "disabled_adapters", "merged_adapters",
           "using_adapter", "ACTIVE"]


def active_adapter(model: nn.Module) -> str | None:
    """The active adapter's name, or None when adapters are switched off (or there are none)."""
    if not is_peft(model) or getattr(model, "_lora_lab_disabled", False):
        return None
    return active_name(model)


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Make ``name`` the active adapter, or pass None to run the plain base model."""
    model = require_peft(model)
    tuner = model.base_model
    if name is None:
        if not hasattr(tuner, "disable_adapter_layers"):
            raise AdapterError("Prefix and prompt tuning cannot be switched off persistently.",
                               "use `with lora_lab.disabled_adapters(model):` around the call")
        tuner.disable_adapter_layers()
        model._lora_lab_disabled = True
        return
    require_adapter(model, name)
    if getattr(model, "_lora_lab_disabled", False):
        tuner.enable_adapter_layers()
        model._lora_lab_disabled = False
    model.set_adapter(name)


@contextlib.contextmanager
def disabled_adapters(model: nn.Module):
    """``with disabled_adapters(model): ...`` runs the base model exactly, then restores adapters."""
    model = require_peft(model)
    with model.disable_adapter():
        yield model


# ------------------------------------------------------------------------------ fast switch
class _Active:
    def __repr__(self) -> str:
        return "ACTIVE"


ACTIVE = _Active()
"""``adapter=ACTIVE``: generate with the model exactly as it is now (its active adapter, if any)."""


def merged_adapters(model: nn.Module) -> list[str]:
    """Names of adapters currently merged into the base weights (empty for a plain model)."""
    if not is_peft(model):
        return []
    names: set[str] = set()
    for m in model.modules():
        if getattr(m, "merged", False):
            names.update(getattr(m, "merged_adapters", []) or [])
    return sorted(names)


def _routing(model) -> tuple[list, dict] | None:
    """The model's adapter layers and each adapter's parameters, cached until an adapter is added
    or deleted; None where the fast switch does not apply (prompt learning, ``modules_to_save``)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    configs = tuple(model.peft_config.items())
    key = tuple((n, id(c)) for n, c in configs)       # the cache holds the configs: ids stay unique
    cached = model.__dict__.get("_lora_lab_routing")
    if cached is not None and cached[0] == key:
        return cached[2]
    routing = None
    if not any(c.is_prompt_learning for _, c in configs):
        mods = list(model.modules())
        if not any(isinstance(m, AuxiliaryTrainingWrapper) for m in mods):
            layers = [m for m in mods if isinstance(m, BaseTunerLayer)]
            params: dict[str, list] = {n: [] for n, _ in configs}
            for layer in layers:
                for attr in layer.adapter_layer_names:
                    for n, sub in getattr(layer, attr).items():
                        ps = [sub] if isinstance(sub, nn.Parameter) else list(sub.parameters())
                        params.setdefault(n, []).extend(ps)
            routing = (layers, params)
    model.__dict__["_lora_lab_routing"] = (key, configs, routing)
    return routing


def switch_adapter(model: nn.Module, name: str | None) -> None:
    """Make ``name`` the active adapter (None: the base model), as :func:`lora_lab.set_adapter`
    does, in time proportional to the adapter layers.

    peft's ``set_adapter`` walks the whole module tree (twice) and, per layer, every loaded
    adapter's sub-modules, so a switch costs milliseconds and grows with the number of adapters
    (8 adapters, shared 2-core CPU: 3–8 ms on ``builtin:tiny`` and 27–37 ms on a 1B-shaped Llama,
    against 0.1–0.2 ms and 1.3 ms here; ``benchmarks/switch.py``).
    A switch needs only (1) the routing: each adapter layer's active adapter
    (``y = W x + s·B_name A_name x``) or "disabled" (``y = W x``), and (2) peft's trainability rule:
    the active adapter's parameters require grad, the others do not.  This sets exactly those, from
    a list of layers and parameters cached until an adapter is added or deleted.  Merged layers,
    prompt learning and ``modules_to_save`` take peft's full path.
    """
    if not is_peft(model):
        if name is None:
            return
        raise AdapterError(f"This model has no adapters, so adapter {name!r} cannot be switched to.",
                           "load one with lora_lab.load_adapter")
    if name is not None and name not in model.peft_config:
        raise AdapterError(f"There is no adapter named {name!r}.",
                           f"pass one of {sorted(model.peft_config)}, or None for the base model")
    routing = _routing(model)
    if routing is None or any(m.merged for m in routing[0]):
        set_adapter(model, name)
        return
    layers, params = routing
    for m in layers:          # plain attributes: skip nn.Module.__setattr__'s checks (18x faster)
        m.__dict__["_disable_adapters"] = name is None
        if name is not None:
            m.__dict__["_active_adapter"] = [name]
    for n, ps in params.items():
        for p in ps:
            if p.requires_grad != (n == name):
                p.requires_grad_(n == name)
    if name is not None:
        model.active_adapter = model.base_model.active_adapter = name
    model._lora_lab_disabled = name is None


class using_adapter:
    """Context: run ``model`` with adapter ``name`` (None: the base model), then switch back."""

    def __init__(self, model, name):
        self.model, self.name, self._prev, self._ctx = model, name, ACTIVE, None

    def __enter__(self):
        if self.name is ACTIVE or (self.name is None and not is_peft(self.model)):
            return self
        current = active_adapter(self.model) if is_peft(self.model) else None
        if self.name == current:
            return self
        merged = merged_adapters(self.model)
        if merged:
            raise AdapterError(f"Adapter(s) {merged} are merged into the base weights, so "
                               f"adapter={self.name!r} cannot run on clean weights.",
                               "unmerge first: lora_lab.unmerge_adapter(model)")
        if self.name is None and _routing(self.model) is None:   # prefix/prompt tuning
            self._ctx = disabled_adapters(self.model)
            self._ctx.__enter__()
            return self
        switch_adapter(self.model, self.name)
        self._prev = current
        return self

    def __exit__(self, *exc):
        if self._ctx is not None:
            self._ctx.__exit__(*exc)
        elif self._prev is not ACTIVE:
            switch_adapter(self.model, self._prev)
        return False
