"""Merge an adapter into the base weights: W' = W + s·B·A.

Merging in place is offered for full-precision bases only.  On a 4-bit base it is refused: bitsandbytes
rearranges packed 4-bit weights the first time a layer runs in eval mode on AVX512-BF16 CPUs, and
peft's merge then reads them in the wrong layout, changing the logits by about 127% with no error
(measured with bitsandbytes 0.50).  :func:`merged_copy` is the safe path for every base: it reloads
the base in full precision, puts the adapter's weights on it, merges there, and reports how far the
merged logits are from the unmerged model's with that adapter switched on.

The merged-vs-unmerged check is written once, here: :func:`make_probe_ids` (random token ids,
fixed by a seed) → :func:`probe_logits` (fp32, eval mode, no bitsandbytes repacking) →
:func:`logit_gap` (max and mean |Δ|, ‖Δ‖ / ‖ref‖).  :func:`merged_copy`, :func:`merge_checked` (what
the switchboard's merge button runs) and :func:`lora_lab.export_merged` all report through it.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import MergeError
from .._peft import base_of, is_peft
from ..model.inspect import is_quantized
from .switch import active_adapter, set_adapter, using_adapter

__all__ = [
    "LogitGap",
    "MergeReport",
    "logit_gap",
    "make_probe_ids",
    "merge_adapter",
    "merge_checked",
    "merged_copy",
    "probe_logits",
    "unmerge_adapter",
]


def _lora_model(model):
    if not is_peft(model) or not hasattr(model.base_model, "merge_adapter"):
        raise MergeError("Only LoRA-style adapters (LoRA, DoRA, rsLoRA, IA3) can be merged.",
                         "prefix and prompt tuning add tokens, not weights; keep them unmerged")
    return model.base_model


def merge_adapter(model: nn.Module, adapter: str | None = None) -> None:
    """Merge ``adapter`` (the active one when None) into the base weights, in place, reversibly."""
    tuner = _lora_model(model)
    if is_quantized(model):
        raise MergeError("Merging into a quantized base is refused: on CPUs with AVX512-BF16, "
                         "bitsandbytes repacks 4-bit weights on their first eval forward and peft's "
                         "merge misreads the packed layout (logits about 127% off, no error); and "
                         "merging into quantized weights changes outputs even where it works.",
                         "use lora_lab.merged_copy(model), which merges into a full-precision copy")
    names = [adapter] if adapter else None
    _keep_sixteen_bit_weights(model, names or list(tuner.active_adapters))
    tuner.merge_adapter(adapter_names=names)


def unmerge_adapter(model: nn.Module) -> None:
    """Undo :func:`merge_adapter`: W = W' − s·B·A (exact up to float rounding in fp32); a 16-bit
    base gets its weights back bit for bit (see :func:`_keep_sixteen_bit_weights`)."""
    _lora_model(model).unmerge_adapter()
    with torch.no_grad():
        for layer, weight in _sixteen_bit_layers(model):
            kept = getattr(layer, _KEPT, None)
            if kept is not None and not layer.merged:
                weight.copy_(kept)
                delattr(layer, _KEPT)


# A bf16 weight has 8 significant bits, so W' = round(W + ΔW) followed by round(W' − ΔW) is not W:
# measured on the tiny Llama with a bf16 base, one merge/unmerge changed a third of the base
# weights (relative error 2.7e-3 per matrix), and each further cycle added to it.  Such layers keep
# their exact W beside them while merged (one 16-bit copy of each merged weight).
_KEPT = "_lora_lab_unmerged_weight"


def _sixteen_bit_layers(model):
    """``(lora layer, base weight)`` for every LoRA layer whose base weight is bf16 or fp16."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            weight = getattr(module.get_base_layer(), "weight", None)
            if weight is not None and weight.dtype in (torch.bfloat16, torch.float16):
                yield module, weight


@torch.no_grad()
def _keep_sixteen_bit_weights(model, adapters: list[str]) -> None:
    """Before a merge: keep an exact copy of each unmerged 16-bit W that ``adapters`` will change.
    A layer that peft unmerged on its own (inexactly) since the last merge gets that copy back."""
    for layer, weight in _sixteen_bit_layers(model):
        kept = getattr(layer, _KEPT, None)
        if layer.merged or not any(a in layer.lora_A for a in adapters):
            continue
        if kept is not None:
            weight.copy_(kept)
        else:
            setattr(layer, _KEPT, weight.detach().clone())


@dataclass(frozen=True)
class MergeReport:
    """How far the merged model's logits are from the unmerged (adapter) model's."""

    adapter: str
    max_abs_logit_diff: float
    rel_logit_diff: float  # ‖Δlogits‖ / ‖logits‖ over the probe tokens
    from_quantized: bool

    @classmethod
    def of(cls, adapter: str, gap: LogitGap, from_quantized: bool) -> MergeReport:
        return cls(adapter=adapter, max_abs_logit_diff=gap.max_abs, rel_logit_diff=gap.rel,
                   from_quantized=from_quantized)

    def __repr__(self) -> str:
        return (f"MergeReport(adapter={self.adapter!r}, rel_logit_diff={self.rel_logit_diff:.2e}, "
                f"max_abs={self.max_abs_logit_diff:.2e}, from_quantized={self.from_quantized})")


# ----------------------------------------------------------------------------- the logit check
def make_probe_ids(model: nn.Module, n: int = 2, length: int = 32, seed: int = 0) -> torch.Tensor:
    """``n × length`` random token ids in [3, vocab) (ids 0-2 are often special), the same for a
    given seed; ``length`` is cut to the model's ``max_position_embeddings``."""
    config = base_of(model).config
    length = min(length, getattr(config, "max_position_embeddings", length) or length)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, config.vocab_size, (n, length), generator=g)


@torch.no_grad()
def probe_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits of ``model`` on ``ids`` (batch × T × vocab, on the CPU), in eval mode and without
    bitsandbytes' CPU repacking; the model's train/eval mode is restored.

    The forward runs in fp32 even on a bf16 or fp16 base (:func:`_fp32_forward`): a 16-bit forward
    rounds every activation to 8 (bf16) or 11 (fp16) significant bits, which on the tiny Llama with
    a bf16 base put 5e-3 of relative noise into both sides of a merged-vs-unmerged check and hid
    any merge error smaller than that; in fp32 an exact merge into fp32 shows 1e-6 there."""
    from ..model.kbit import no_repacking

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with no_repacking(model), _fp32_forward(model):
            return model(input_ids=ids.to(device)).logits.float().cpu()
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _fp32_forward(model: nn.Module):
    """Run ``model``'s forwards with its bf16/fp16 tensors in fp32, one module at a time: each module
    that holds 16-bit parameters or buffers has them upcast just before its forward and cast back
    just after (16 → 32 → 16 bits is exact), so the extra memory is one module's fp32 copy."""
    sixteen = (torch.bfloat16, torch.float16)
    owners = [(m, [t for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))
                   if t is not None and t.dtype in sixteen]) for m in model.modules()]
    owners = [(m, ts) for m, ts in owners if ts]
    dtypes = {id(t): t.dtype for _, ts in owners for t in ts}

    def up(tensors):
        def hook(module, args):
            for t in tensors:
                t.data = t.data.float()
        return hook

    def down(tensors):
        def hook(module, args, out):
            for t in tensors:
                t.data = t.data.to(dtypes[id(t)])
        return hook

    handles = [h for m, ts in owners for h in (m.register_forward_pre_hook(up(ts)),
                                               m.register_forward_hook(down(ts)))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for _, ts in owners:    # a forward that raised left its module upcast
            for t in ts:
                t.data = t.data.to(dtypes[id(t)])


@dataclass(frozen=True)
class LogitGap:
    """How far logits ``out`` are from reference logits ``ref`` (same shape):
    ``max_abs`` = max |out − ref|, ``mean_abs`` = mean |out − ref|, ``rel`` = ‖out − ref‖ / ‖ref‖."""

    max_abs: float
    mean_abs: float
    rel: float


def logit_gap(ref: torch.Tensor, out: torch.Tensor) -> LogitGap:
    """The one merged-vs-unmerged check: :class:`LogitGap` of ``out`` against ``ref``."""
    diff = out.float() - ref.float()
    return LogitGap(max_abs=float(diff.abs().max()), mean_abs=float(diff.abs().mean()),
                    rel=float(diff.norm() / ref.float().norm().clamp_min(1e-12)))


def _full_precision_base(model) -> nn.Module:
    from transformers import AutoModelForCausalLM

    from ..model.loading import base_source, resolve_source

    source = base_source(model)
    try:
        path = resolve_source(source)
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu")
    except Exception as exc:
        raise MergeError(f"Could not reload the base model {source!r} in full precision to merge "
                         f"into: {exc}", "load the base with lora_lab.load_model so its source is "
                         "known, and keep that folder available") from exc


def copy_bytes(model: nn.Module, quantized: bool) -> tuple[int, torch.device]:
    """What :func:`merged_copy` allocates, and where: a quantized base is reloaded in fp32 on the CPU
    (4 bytes for each base parameter, counted unpacked); any other model is deep-copied where it is
    (its parameters and buffers, each tensor once: tied weights are shared)."""
    from ..model.inspect import count_parameters

    if quantized:
        count = count_parameters(model)
        return 4 * (count.total - count.trainable), torch.device("cpu")
    seen, total = set(), 0
    for t in (*model.parameters(), *model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total, next(model.parameters()).device


def _refuse_if_it_cannot_fit(model: nn.Module, quantized: bool) -> None:
    """A :class:`MergeError` before anything is allocated when the copy would not fit where it goes
    (:func:`~lora_lab.hf.model.device.free_memory_bytes`): an out-of-memory kill of the kernel would
    take the session with it (a 7B QLoRA base reloads as 28 GB of fp32; Colab's VM has 12.7 GB)."""
    from ..model.device import free_memory_bytes

    need, device = copy_bytes(model, quantized)
    free = free_memory_bytes(device)
    if free is not None and need > free:
        what = "reload the base in fp32 on the CPU" if quantized else f"copy the model on {device}"
        raise MergeError(f"merged_copy would {what}: {need / 1e9:.2f} GB, and {free / 1e9:.2f} GB are "
                         "free there.",
                         "write the merged model to disk instead with lora_lab.export_merged(model, "
                         "folder), which streams it one shard at a time (peak about one shard), and "
                         "load that folder with transformers' from_pretrained when you need it")


@torch.no_grad()
def merged_copy(model: nn.Module, adapter: str | None = None,
                probe_ids: torch.Tensor | None = None) -> tuple[nn.Module, MergeReport]:
    """A plain transformers model with ``adapter`` merged in, and a :class:`MergeReport`.

    The original ``model`` is left as it was.  For a quantized base the merge happens in a
    full-precision reload of the base (never in packed 4-bit weights); the report then shows the
    quantization gap, since the adapter was trained against Q(W), not W.  A copy that would not fit
    in the memory free where it goes is refused before anything is allocated (:class:`MergeError`,
    whose fix is :func:`lora_lab.export_merged`, streamed shard by shard).
    """
    import peft

    _lora_model(model)
    adapter = _adapter_to_merge(model, adapter, "merged_copy")
    quantized = is_quantized(model)
    ids = probe_ids if probe_ids is not None else make_probe_ids(model)
    _refuse_if_it_cannot_fit(model, quantized)
    with using_adapter(model, adapter):    # the reference: the unmerged model with this adapter on
        ref = probe_logits(model, ids)
    if quantized:
        base = _full_precision_base(model)
        config = copy.deepcopy(model.peft_config[adapter])
        merged = peft.get_peft_model(base, config, adapter_name=adapter)
        state = peft.get_peft_model_state_dict(model, adapter_name=adapter)
        peft.set_peft_model_state_dict(merged, state, adapter_name=adapter)
        merged = merged.merge_and_unload()
    else:
        clone = copy.deepcopy(model)
        clone.set_adapter(adapter)
        merged = clone.merge_and_unload(adapter_names=[adapter])
    merged.eval()
    gap = logit_gap(ref, probe_logits(merged, ids))
    return merged, MergeReport.of(adapter, gap, from_quantized=quantized)


def _adapter_to_merge(model, adapter: str | None, what: str) -> str:
    """``adapter``, checked, or the active adapter when None; a :class:`MergeError` with the fix when
    there is no such adapter or (for None) the adapters are switched off."""
    if adapter is None:
        adapter = active_adapter(model)
        if adapter is None:
            raise MergeError(f"{what} got no adapter name and the adapters are switched off, so "
                             "there is no active adapter to merge.",
                             f"name it: lora_lab.{what}(model, 'name'), one of {sorted(model.peft_config)}")
    elif adapter not in model.peft_config:
        raise MergeError(f"There is no adapter named {adapter!r} to merge.",
                         f"pass one of {sorted(model.peft_config)}")
    return adapter


def merge_checked(model: nn.Module, adapter: str | None = None,
                  probe_ids: torch.Tensor | None = None) -> tuple[MergeReport, torch.Tensor]:
    """:func:`merge_adapter` in place, checked: the logits on ``probe_ids`` (default: one random
    sequence of 16 tokens) before and after the merge, as a :class:`MergeReport`.

    ``adapter`` becomes the active adapter first (adapters switched on): a merged layer computes
    (W + s·B·A) x plus the active adapter's s·B·A x, and peft unmerges a merged layer whose adapters
    are switched off at its next forward, so only then does the model compute W + s·B·A.

    Returns the report and the logits before the merge, so that an unmerge can be checked against
    them with :func:`logit_gap`."""
    _lora_model(model)
    adapter = _adapter_to_merge(model, adapter, "merge_checked")
    if active_adapter(model) != adapter:
        set_adapter(model, adapter)
    ids = probe_ids if probe_ids is not None else make_probe_ids(model, n=1, length=16)
    before = probe_logits(model, ids)
    merge_adapter(model, adapter)
    return MergeReport.of(adapter, logit_gap(before, probe_logits(model, ids)), False), before
