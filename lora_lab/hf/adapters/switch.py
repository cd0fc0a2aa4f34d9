"""Switch between the adapters loaded on one base model, or switch them all off.

Switching works on weights that are already loaded: no reload, no re-merge.  :func:`set_adapter`
(also reachable as :func:`switch_adapter`, its older name) re-routes the adapter layers directly:
under a millisecond for the 210 LoRA modules of an all-linear adapter on SmolLM2-135M, where
peft's own ``set_adapter`` walks the whole module tree and costs 12-60 ms with 2-8 adapters loaded
(``benchmarks/switch.py``).  peft's path is taken only where the direct one does not apply (merged
layers, prompt learning, ``modules_to_save``, tuners that switch in their own way).  ``None``
means the base model: every adapter off, so the model computes exactly the base.
:func:`disabled_adapters` does the same for a ``with`` block, and :class:`using_adapter` switches
for one call and back (generation and :func:`lora_lab.merged_copy` use it).
"""

from __future__ import annotations

import contextlib
from itertools import filterfalse
from operator import attrgetter

from torch import nn

from ...errors import AdapterError
from .._peft import active_name, is_peft, require_peft

__all__ = [
    "ACTIVE",
    "active_adapter",
    "disabled_adapters",
    "merged_adapters",
    "set_adapter",
    "switch_adapter",
    "using_adapter",
]

_REQUIRES_GRAD = attrgetter("requires_grad")      # filter() reads it in C, faster than a Python loop


def active_adapter(model: nn.Module) -> str | None:
    """The active adapter's name, or None when adapters are switched off (or there are none)."""
    if not is_peft(model) or getattr(model, "_lora_lab_disabled", False):
        return None
    return active_name(model)


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Make ``name`` the active adapter, or pass None to run the plain base model.

    The model ends as peft leaves it after ``model.base_model.enable_adapter_layers()`` and
    ``model.set_adapter(name)`` (for None: ``model.base_model.disable_adapter_layers()``):
    (1) the routing: every adapter layer computes ``y = W x + s·B_name A_name x`` (None:
    ``y = W x``), and (2) peft's trainability rule: the active adapter's parameters require grad
    (except those its LoRA variant keeps frozen), all other adapters' parameters do not.

    Only the adapter layers and their parameters are touched, from lists cached until an adapter
    is added or deleted, so the cost grows with the adapter layers, not with the model.  The first
    switch after the lists are made (and after peft's own ``set_adapter``, ``enable_adapter_layers``
    or ``disable_adapter_layers``, or a whole adapter's ``requires_grad`` changed) sets the flag of
    every adapter parameter; later switches change only the adapters switched off and on (so a
    flag changed by hand on some layers of a third adapter stays as it is, where peft would reset
    it).  Merged
    layers, prompt learning, ``modules_to_save`` and tuners that switch in their own way take
    peft's path (peft unmerges merged layers first, with a warning).
    """
    if not is_peft(model):
        if name is None:
            return                                   # a plain model is the base model already
        raise AdapterError(f"This model has no adapters, so adapter {name!r} cannot be switched to.",
                           "load one with lora_lab.load_adapter(model, folder)")
    if name is not None and name not in model.peft_config:
        raise AdapterError(f"There is no adapter named {name!r}.",
                           f"pass one of {sorted(model.peft_config)}, or None for the base model")
    routing = _routing(model)
    if routing is None or not _reroute(routing, name):
        _peft_set_adapter(model, name)
        return
    if name is not None:
        model.active_adapter = model.base_model.active_adapter = name
    model._lora_lab_disabled = name is None


class _Routing:
    """A peft model's adapter layers, each adapter's parameters (``params``: name → list) and the
    parameters kept frozen whatever is active (``frozen``), plus what the last switch left
    (``last``: the active name or None, and the first and last layer's ``_active_adapter`` list,
    by identity: peft's own switches put new lists there)."""

    __slots__ = ("frozen", "last", "layers", "params")

    def __init__(self, layers, params, frozen):
        self.layers, self.params, self.frozen, self.last = layers, params, frozen, None

    def unchanged(self) -> tuple[bool, str | None]:
        """``(True, previous name)`` when nothing but our switches changed the routing or a whole
        adapter's flags since the last one (a cheap check: two layers, one parameter per adapter)."""
        if self.last is None:
            return False, None
        prev, first, final = self.last
        d0, d1 = self.layers[0].__dict__, self.layers[-1].__dict__
        if (d0.get("_active_adapter") is not first or d1.get("_active_adapter") is not final
                or d0.get("_disable_adapters", False) != (prev is None)):
            return False, None
        for n, ps in self.params.items():
            if ps and n != prev and ps[0].requires_grad:
                return False, None
        return not (self.frozen and self.frozen[0].requires_grad), prev


def _reroute(routing: _Routing, name: str | None) -> bool:
    """Set the routing and ``requires_grad`` flags for ``name`` (None: all adapters off); False
    (flags untouched, the routing of some layers maybe set) when a layer is merged."""
    same, prev = routing.unchanged()
    for m in routing.layers:                # one pass: each layer's attributes are read once
        if m.merged_adapters:
            routing.last = None
            return False
        d = m.__dict__        # plain attributes: skip nn.Module.__setattr__'s checks (18x faster)
        d["_disable_adapters"] = name is None
        if name is not None:
            d["_active_adapter"] = [name]
    if same:     # only the adapters switched off and on: their flags are known, so just set them
        for n in {prev, name} - {None}:
            on = n == name
            for p in routing.params[n]:
                p.requires_grad = on
    else:                                             # every adapter parameter, as peft does
        for n, ps in routing.params.items():
            if n == name:
                for p in filterfalse(_REQUIRES_GRAD, ps):
                    p.requires_grad_(True)
            else:
                for p in filter(_REQUIRES_GRAD, ps):
                    p.requires_grad_(False)
        for p in filter(_REQUIRES_GRAD, routing.frozen):
            p.requires_grad_(False)
    routing.last = (name, routing.layers[0].__dict__.get("_active_adapter"),
                    routing.layers[-1].__dict__.get("_active_adapter"))
    return True


switch_adapter = set_adapter
"""The older name of :func:`set_adapter`: the same function."""


def _peft_set_adapter(model, name: str | None) -> None:
    """peft's own path: walks the whole module tree (milliseconds)."""
    tuner = model.base_model
    if name is None:
        if not hasattr(tuner, "disable_adapter_layers"):
            raise AdapterError("Prefix and prompt tuning cannot be switched off persistently.",
                               "use `with lora_lab.disabled_adapters(model):` around the call")
        tuner.disable_adapter_layers()
        model._lora_lab_disabled = True
        return
    if hasattr(tuner, "enable_adapter_layers") and _any_disabled(model):
        tuner.enable_adapter_layers()
    model.set_adapter(name)
    model._lora_lab_disabled = False


def _any_disabled(model) -> bool:
    """True when switched off by lora_lab, or when any adapter layer is disabled: peft's
    ``set_adapter`` does not undo ``disable_adapter_layers()``, so a switch must."""
    if getattr(model, "_lora_lab_disabled", False):
        return True
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(m.disable_adapters for m in model.modules() if isinstance(m, BaseTunerLayer))


@contextlib.contextmanager
def disabled_adapters(model: nn.Module):
    """``with disabled_adapters(model): ...`` runs the base model exactly, then restores adapters."""
    model = require_peft(model)
    with model.disable_adapter():
        yield model


# ------------------------------------------------------------------------------ routing
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


def adapter_layers(model) -> list[nn.Module] | None:
    """Every adapter layer of ``model`` from the list this module keeps until an adapter is added
    or deleted (walking the modules costs ~10 ms on builtin:tiny with 16 adapters); None where the
    direct switch does not apply (see :func:`_routing`)."""
    routing = _routing(model)
    return None if routing is None else routing.layers


def _routing(model) -> _Routing | None:
    """The model's :class:`_Routing`, cached until an adapter is added or deleted; None where the
    direct switch does not apply (prompt learning, ``modules_to_save``,
    a tuner or layer class that overrides peft's ``set_adapter`` / ``enable_adapters``).
    ``frozen``: the parameters a LoRA variant declares non-trainable (``frozen_peft_weight_names``),
    which peft keeps off whatever is active."""
    configs = tuple(model.peft_config.items())
    key = tuple((n, id(c)) for n, c in configs)       # the cache holds the configs: ids stay unique
    cached = model.__dict__.get("_lora_lab_routing")
    if cached is not None and cached[0] == key:
        return cached[2]
    routing = None if any(c.is_prompt_learning for _, c in configs) else _scan(model, configs)
    model.__dict__["_lora_lab_routing"] = (key, configs, routing)
    return routing


def _scan(model, configs) -> _Routing | None:
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    if type(model.base_model).set_adapter is not BaseTuner.set_adapter:
        return None
    mods = list(model.modules())
    if any(isinstance(m, AuxiliaryTrainingWrapper) for m in mods):
        return None
    layers = [m for m in mods if isinstance(m, BaseTunerLayer)]
    if not layers or any(type(m).set_adapter is not BaseTunerLayer.set_adapter
           or type(m).enable_adapters is not BaseTunerLayer.enable_adapters for m in layers):
        return None
    params: dict[str, list] = {n: [] for n, _ in configs}
    frozen: list = []
    for layer in layers:
        keep_off = getattr(layer, "frozen_peft_weight_names", None) or {}
        for attr in layer.adapter_layer_names:
            for n, sub in getattr(layer, attr).items():
                ps = [sub] if isinstance(sub, nn.Parameter) else list(sub.parameters())
                ps = [p for p in ps if p.is_leaf]           # as peft's _set_layer_requires_grad
                (frozen if attr in keep_off.get(n, ()) else params.setdefault(n, [])).extend(ps)
    return _Routing(layers, params, frozen)


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
        set_adapter(self.model, self.name)
        self._prev = current
        return self

    def __exit__(self, *exc):
        if self._ctx is not None:
            self._ctx.__exit__(*exc)
        elif self._prev is not ACTIVE:
            set_adapter(self.model, self._prev)
        return False
