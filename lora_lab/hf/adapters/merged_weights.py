"""The merged model's tensors, read one at a time from a peft LoRA model that stays unmerged.

:func:`merged_items` walks the wrapped transformers model and yields, for every tensor of the plain
(merged) model, ``(name, shape, source dtype, make)``: ``make()`` builds the tensor only when it is
called, so a writer can hold one shard at a time (:func:`lora_lab.export_merged`).  The merge never
happens inside the model:

* each weight is read from the model *as it computes with it*.  A 4-bit weight (NF4/FP4, QLoRA §3)
  is dequantized (``bitsandbytes.functional.dequantize_4bit``, or the CPU-packed layout bitsandbytes
  switches to after an eval forward, decoded from its own codebook and bf16 block scales); an int8
  weight (LLM.int8()) is ``CB · SCB / 127`` per row (:func:`lora_lab.hf.model.kbit.dense_weight`).
  peft's merge is never called on a 4-bit layer: on AVX512-BF16 CPUs it reads repacked weights in
  the wrong layout and silently corrupts the weights;
* the adapter's update is added in fp32: ΔW = s·B·A with s = α/r, or α/√r for rsLoRA (peft's
  ``scaling`` dict holds the right one).  DoRA (Liu et al. 2024, §4.1) rescales every output row:
  W' = m ⊙ (W + ΔW) / ‖W + ΔW‖_row  (:func:`merged_weight`).

Names are the plain transformers ones: peft's ``base_layer.`` and wrapper levels are removed, a
``modules_to_save`` copy stands in for the module it replaces, and a tied parameter appears once.
:func:`mergeable_adapter` says which adapter that is, or why the model cannot be merged this way.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from ...errors import MergeError
from .._peft import active_name, is_peft
from ..model.kbit import dense_weight

__all__ = ["mergeable_adapter", "merged_weight", "merged_items"]

Item = tuple[str, tuple, torch.dtype, Callable[[], torch.Tensor]]
"""``(name, shape, source dtype, make)``: one tensor of the merged model, built by ``make()``."""


def mergeable_adapter(model) -> str:
    """The name of ``model``'s one active LoRA adapter, ready to merge; a :class:`MergeError` with
    the fix when ``model`` has no peft wrapper, carries a non-LoRA adapter (prefix, prompt, IA3),
    has its adapters switched off or several active, or has layers merged in place already."""
    import peft
    from peft.tuners.lora import LoraLayer

    if not is_peft(model):
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
    if isinstance(active, (list, tuple)) and len(active) != 1:
        raise MergeError(f"Several adapters are active at once ({list(active)}).",
                         "activate one with lora_lab.set_adapter, or blend them first with "
                         "lora_lab.blend_adapters")
    if any(isinstance(m, LoraLayer) and m.merged for m in model.modules()):
        raise MergeError("Some LoRA layers are merged in place already.",
                         "unmerge first with lora_lab.unmerge_adapter(model), then export")
    return active_name(model)


def merged_weight(layer, adapter: str) -> torch.Tensor:
    """W + s·B·A (or DoRA's row-rescaled version) of one peft LoRA layer, in fp32.

    W is the base weight as the layer computes with it (dequantized for a 4/8-bit base); a layer
    that does not hold ``adapter`` gives W itself.  The layer is not changed."""
    base = layer.get_base_layer()
    w = dense_weight(base, base.weight).float()
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


def merged_items(model, adapter: str) -> Iterator[Item]:
    """``(name, shape, source dtype, make)`` for every tensor of the merged model, in model order.

    Names are the plain transformers ones (peft's ``base_layer.`` and wrapper levels removed); a
    tied parameter appears once.  The shape of a packed 4-bit weight is its unpacked shape, and its
    source dtype (like an int8 weight's, and every merged LoRA weight's) is fp32: what ``make()``
    returns before the writer casts it.  Nothing is computed until ``make()`` is called.
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
                   lambda: merged_weight(module, adapter))
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
            yield prefix + name, shape_of(t), dtype, (lambda m=module, t=t: dense_weight(m, t))

    yield from walk(model.get_base_model(), "")
