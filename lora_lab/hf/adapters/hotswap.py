"""Hot-swap: load a saved LoRA adapter's weights into an adapter slot that is already there, in place.

Loading an adapter the usual way (:func:`lora_lab.load_adapter`) adds new modules (``lora_A[name]``,
``lora_B[name]``) to every targeted layer.  A ``torch.compile``d model guards on its module structure
and on Python numbers such as the LoRA scaling s = α/r, so new modules or a new s mean a
recompilation: seconds to minutes, once per adapter.  Hot-swapping copies the new A (r × in) and B
(out × r) into the existing tensors instead, so nothing the compiled graph depends on changes::

    A_slot[:r_new, :] ← A_new,  A_slot[r_new:, :] ← 0        (rank r_slot ≥ r_new: zero padding)
    B_slot[:, :r_new] ← B_new,  B_slot[:, r_new:] ← 0        so B_slot A_slot = B_new A_new exactly
    s_slot ← α_new / r_new   (α/√r for rsLoRA), written into a 0-d tensor

Zero padding is exact: the extra rank-one terms are 0·0.  :func:`prepare_hotswap` gets a model ready
*before* compiling (peft's ``prepare_model_for_compiled_hotswap``): it pads every slot to the largest
rank you will swap in and turns each scaling into a tensor, so that a different rank or α does not
change a guard.  :class:`CompileCounter` counts the compilations dynamo makes, so you can see a swap
cost none.  This is the mechanism behind peft's ``hotswap_adapter`` and diffusers' LoRA hot-swap;
it is implemented here (after peft 0.21's ``hotswap_adapter_from_state_dict``) so that a mismatch is
named tensor by tensor before anything is written, and so that only the slot's own tensors are
touched (peft finds a slot's tensors by substring, so a slot named ``"a"`` would also match
``lora_A`` of every other adapter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path

import torch
from torch import nn

from ...errors import AdapterError, AdapterMismatchError
from .._peft import require_adapter, require_peft

__all__ = ["CompileCounter", "HotswapReport", "hotswap_adapter", "prepare_hotswap"]


@dataclass(frozen=True)
class HotswapReport:
    """What a hot-swap wrote: the slot, the source folder, the new rank and α against the slot's
    (padded) rank, the tensors copied, and the slot tensors zeroed because the new adapter does not
    target their layer."""

    name: str
    source: str
    rank: int
    alpha: float
    slot_rank: int
    copied: int
    zeroed: int

    def __repr__(self) -> str:
        return (f"HotswapReport({self.name!r} ← {self.source}: r={self.rank} in a rank-{self.slot_rank} "
                f"slot, α={self.alpha:g}, {self.copied} tensors copied, {self.zeroed} zeroed)")


def _inner(model):
    """The peft model inside a ``torch.compile`` wrapper (or ``model`` itself)."""
    return require_peft(getattr(model, "_orig_mod", model))


def prepare_hotswap(model: nn.Module, target_rank: int | None = None) -> None:
    """Get a peft model ready for hot-swaps that must not recompile it; call it *before*
    ``torch.compile``.  Pads every LoRA slot to ``target_rank`` (the largest rank you will swap
    in; None keeps the ranks) and turns every scaling into a tensor (peft's
    ``prepare_model_for_compiled_hotswap``).  The outputs do not change: padding is zeros."""
    from peft.utils.hotswap import prepare_model_for_compiled_hotswap

    if hasattr(model, "_orig_mod"):
        raise AdapterError("The model is compiled already: padding it now would recompile it.",
                           "call prepare_hotswap(model, target_rank) before torch.compile(model)")
    model = require_peft(model)
    if target_rank is not None and (isinstance(target_rank, bool) or not isinstance(target_rank, int)
                                    or target_rank < 1):
        raise AdapterError(f"target_rank={target_rank!r} is not a rank.",
                           "pass the largest LoRA rank you will swap in, e.g. target_rank=16")
    prepare_model_for_compiled_hotswap(model, target_rank=target_rank, config=model.peft_config)


def _read(path: Path, name: str):
    """The saved adapter's config and its tensors renamed to the model's keys
    (``base_model.model.….lora_A.<name>.weight``)."""
    from peft import LoraConfig
    from peft.utils.save_and_load import _insert_adapter_name_into_state_dict, load_peft_weights

    for file in ("adapter_config.json", "adapter_model.safetensors"):
        if not (path / file).exists():
            raise AdapterError(f"{path} has no {file}, so it is not a saved adapter lora_lab can read "
                               "(safetensors only: nothing is unpickled).",
                               "pass a folder written by lora_lab.save_adapter or peft's save_pretrained")
    config = LoraConfig.from_pretrained(str(path))
    state = load_peft_weights(str(path), device="cpu")
    return config, _insert_adapter_name_into_state_dict(state, adapter_name=name, parameter_prefix="lora_")


def _check(model, name: str, config, state: dict, path: Path) -> None:
    """Every problem, before anything is written: not LoRA, DoRA, options that change the math,
    tensors the slot has no place for (other targets), and shapes that do not fit."""
    from peft.utils.hotswap import check_hotswap_configs_compatible

    slot = model.peft_config[name]
    if str(config.peft_type).split(".")[-1] != "LORA" or slot.use_dora or config.use_dora:
        raise AdapterMismatchError(f"Only plain LoRA adapters can be hot-swapped (slot {name!r}: "
                                   f"{'DoRA' if slot.use_dora else slot.peft_type}, {path}: "
                                   f"{'DoRA' if config.use_dora else config.peft_type}).",
                                   "use lora_lab.load_adapter(model, path) for this one")
    try:
        check_hotswap_configs_compatible(slot, config)
    except ValueError as exc:
        raise AdapterMismatchError(f"{path} cannot replace slot {name!r}: {exc}.",
                                   "train both adapters with the same use_rslora, dropout and "
                                   "alpha_pattern, or load it with lora_lab.load_adapter") from exc
    for key, new in state.items():
        try:
            old = attrgetter(key)(model)
        except AttributeError:
            raise AdapterMismatchError(
                f"{path} has tensor {key.removeprefix('base_model.model.')}, but slot {name!r} has no "
                "such tensor: the adapter targets a layer the slot does not.",
                "hot-swap only adapters trained on the same target modules; load this one with "
                "lora_lab.load_adapter(model, path)") from None
        rank_dim = 0 if ".lora_A." in key else 1
        fixed = 1 - rank_dim
        if new.dim() != old.dim() or new.shape[fixed] != old.shape[fixed] or \
                new.shape[rank_dim] > old.shape[rank_dim]:
            why = ("its rank is larger than the slot's" if new.dim() == old.dim()
                   and new.shape[fixed] == old.shape[fixed] else "the layer sizes differ")
            raise AdapterMismatchError(
                f"Tensor {key.removeprefix('base_model.model.')} of {path} has shape {tuple(new.shape)}, "
                f"the slot's is {tuple(old.shape)}: {why}.",
                f"pad the slot before compiling: prepare_hotswap(model, target_rank={new.shape[rank_dim]})"
                if why.startswith("its rank") else "swap in an adapter trained for this base model")


@torch.no_grad()
def hotswap_adapter(model: nn.Module, path, name: str) -> HotswapReport:
    """Replace the weights of loaded adapter ``name`` with the LoRA adapter saved in ``path``, in
    place: same modules, same tensors (new values), so a compiled model does not recompile.

    ``model`` may be the peft model or its ``torch.compile`` wrapper.  Every tensor is checked
    before any is written; a tensor the slot lacks (other targets), a shape that does not fit (layer
    size, or a rank above the slot's: see :func:`prepare_hotswap`), DoRA, or options that change the
    math (rsLoRA, dropout, alpha_pattern) raise :class:`AdapterMismatchError` naming the tensor or
    option, and leave the model as it was.  The slot keeps its name; ``lora_lab.list_adapters``
    shows the new source.
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils.hotswap import _update_scaling
    from peft.utils.other import get_pattern_key

    from .io import read_adapter_spec
    from .switch import merged_adapters

    inner = _inner(model)
    require_adapter(inner, name)
    if name in merged_adapters(inner):
        raise AdapterError(f"Adapter {name!r} is merged into the base weights; swapping its factors "
                           "now would make the later unmerge subtract the wrong ΔW.",
                           "unmerge first: lora_lab.unmerge_adapter(model)")
    path = Path(path)
    config, state = _read(path, name)
    _check(inner, name, config, state, path)
    slot_rank, zeroed = 0, 0
    new_keys = set(state)
    for mod_name, module in inner.named_modules():
        if isinstance(module, LoraLayer) and name in module.lora_A:
            slot_rank = max(slot_rank, module.lora_A[name].weight.shape[0])
            for part in ("lora_A", "lora_B"):
                key = f"{mod_name}.{part}.{name}.weight"
                if key not in new_keys:                     # not targeted by the new adapter
                    getattr(module, part)[name].weight.zero_()
                    zeroed += 1
    for key, new in state.items():
        module = inner.get_submodule(".".join(key.split(".")[:-3]))
        rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), key), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), key), config.lora_alpha)
        _update_scaling(module, name, alpha / math.sqrt(rank) if config.use_rslora else alpha / rank)
        old = attrgetter(key)(inner)
        new = new.to(device=old.device, dtype=old.dtype)
        if old.shape != new.shape:
            old.zero_()
        old[tuple(slice(0, n) for n in new.shape)].copy_(new)
    for attr, value in (("lora_lab_sources", str(path)), ("lora_lab_specs", read_adapter_spec(path))):
        d = dict(getattr(inner, attr, {}))
        d[name] = value
        setattr(inner, attr, d)
    return HotswapReport(name=name, source=str(path), rank=config.r, alpha=float(config.lora_alpha),
                         slot_rank=slot_rank, copied=len(state), zeroed=zeroed)


class CompileCounter:
    """Count dynamo's compilations (first compiles and recompiles) inside a ``with`` block::

        with CompileCounter() as cc:
            compiled(**batch); hotswap_adapter(model, path, "slot"); compiled(**batch)
        cc.count    # graphs compiled in the block: 0 when every call reused the compiled graph

    Reads ``torch._dynamo.utils.counters["stats"]["unique_graphs"]`` (one per graph dynamo hands
    to the backend), so it counts whatever backend ``torch.compile`` uses.
    """

    def __init__(self):
        self.count = 0
        self._start = 0

    @staticmethod
    def _now() -> int:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])

    def __enter__(self):
        self._start = self._now()
        return self

    def __exit__(self, *exc):
        self.count = self._now() - self._start
        return False

    def __repr__(self) -> str:
        return f"CompileCounter({self.count} compilations)"
