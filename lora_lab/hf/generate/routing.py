"""Per-row LoRA routing without a loop over adapters: the K adapters of a batch stacked side by side.

Row i of a mixed batch wants adapter k(i) (or the base).  In every LoRA layer (Hu et al. 2021, §4.1)::

    y_i = W x_i + s_k(i) · B_k(i) A_k(i) x_i

peft's mixed forward loops over the adapters of the batch: for each, gather its rows, run its two
thin matmuls, scatter the result back (``lora/layer.py: _mixed_batch_forward``).  On a small model
(or a CPU) that Python loop, its fancy indexing and its 3·K small kernels cost more than the matmuls,
so four adapters ran at half the single-adapter speed on builtin:tiny.

Punica (Chen et al. 2023) and S-LoRA (Sheng et al. 2023) compute the LoRA term of all rows in one
kernel instead: Punica's BGMV gathers each row's A and B from a stack of the adapters.  Without a custom
kernel, a gather copies one (r × in) and one (out × r) matrix *per row*.  Here the adapters are
stacked *along the rank* once per batch, and a per-row mask picks each row's block::

    A_cat = [A_1; A_2; …; A_K]          (R × in,  R = r_1 + … + r_K: ranks may differ, no padding)
    B_cat = [B_1, B_2, …, B_K]          (out × R)
    M[i]  = s_k(i) on the columns of block k(i), 0 elsewhere       (rows × R; all 0 for a base row)

    Y = X Wᵀ  +  ((X A_catᵀ) ⊙ M) B_catᵀ                          (rows × T × out)

Exact: a row's masked product ``(x A_catᵀ) ⊙ M`` is ``s_k · A_k x`` on its block and 0 on the others,
and the zero columns add nothing to ``B_cat``'s product, so row i gets ``s_k B_k A_k x`` (up to float
rounding, as for any change of batch shape).  The same four small kernels per layer whatever K is
(two thin matmuls, the product with M, the add), the base matmul shared by every row, and each
adapter's weights read once per step (a per-row gather reads them once per *row*).  The price: the
thin matmuls are R = Σ r_k wide for every row, so the LoRA work grows with K (at K = 4 and r = 8 on
SmolLM2-135M's 576-wide q_proj: R = 32, +11 % of the base layer's multiply-adds; at K = 16, +44 %).
``benchmarks/serving.py`` measures what that costs end to end.

:func:`stacked_lora` installs the routed forward on each LoRA layer for one ``with`` block and puts
every layer back as it was on the way out (also on error); :func:`stack_reason` says when a model
cannot take this path (then peft's own mixed forward runs, exact too, only slower, or, where peft's
cannot either (:func:`peft_mix_reason`), the rows run in groups, one adapter per group).
This module knows peft's layer internals (``lora_A``, ``lora_B``, ``scaling``, ``lora_variant``,
``merged_adapters``, ``base_layer``).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ...errors import AdapterError

__all__ = ["stack_reason", "stacked_lora", "peft_mix_reason", "LayerStack"]


def _lora_classes() -> tuple[type, ...]:
    """peft's LoRA layers whose forward is ``base_layer(x) + Σ s·B(A(dropout(x)))``: plain Linear and
    bitsandbytes' 8-bit and 4-bit Linear (QLoRA)."""
    from peft.tuners.lora import layer

    classes = [layer.Linear]
    try:
        from peft.tuners.lora import bnb

        classes += [c for c in (getattr(bnb, "Linear8bitLt", None), getattr(bnb, "Linear4bit", None)) if c]
    except ImportError:  # bitsandbytes missing
        pass
    return tuple(classes)


def _lora_layers(model: nn.Module) -> list[nn.Module] | None:
    """Every adapter layer of ``model``, from the list :mod:`~lora_lab.hf.adapters.switch` keeps
    until an adapter is added or deleted (walking the modules costs ~10 ms on builtin:tiny with 16
    adapters: a decoding step); None where peft's own routing is needed (``modules_to_save``,
    trainable tokens, prompt learning, tuners that switch in their own way)."""
    from ..adapters.switch import adapter_layers

    return adapter_layers(model)


def stack_reason(model: nn.Module, names: list[str | None]) -> str | None:
    """None when the rows' adapters ``names`` (None: the base) can be routed by :func:`stacked_lora`;
    else why not (peft's per-adapter mixed forward is used then, exact but slower)."""
    wanted = {n for n in names if n is not None}
    for name in sorted(wanted):
        cfg = model.peft_config[name]
        if getattr(cfg, "modules_to_save", None) or getattr(cfg, "trainable_token_indices", None):
            return f"{name!r} trains whole modules or token rows beside its LoRA layers"
    layers = _lora_layers(model)
    if layers is None:
        return "the model has modules_to_save, trainable tokens or a tuner with its own routing"
    supported = _lora_classes()
    for m in layers:
        lora_a = getattr(m, "lora_A", None)
        here = wanted & set(lora_a.keys()) if isinstance(lora_a, nn.ModuleDict) else set()
        if here and not isinstance(m, supported):
            return f"{sorted(here)} adapt a {type(m).__name__} layer (only Linear layers are stacked)"
        for n in sorted(here):
            if n in getattr(m, "lora_variant", {}) or n in getattr(m, "merged_adapters", []):
                return f"{n!r} has a LoRA variant or is merged in a {type(m).__name__} layer"
            if getattr(m.lora_B[n], "bias", None) is not None:
                return f"{n!r} has a bias on lora_B (lora_bias=True)"
    return None


def peft_mix_reason(model: nn.Module, names: list[str | None]) -> str | None:
    """None when peft's own mixed forward can take the rows' adapters ``names``; else why not.
    peft 0.21 looks each row's adapter up in every ``modules_to_save`` / trainable-token wrapper
    (``KeyError`` for an adapter without its own copy there), so every such wrapper must hold every
    row's adapter (a base row is fine)."""
    from peft.utils.other import AuxiliaryTrainingWrapper

    wanted = {n for n in names if n is not None}
    for m in model.modules():
        if isinstance(m, AuxiliaryTrainingWrapper):
            missing = wanted - set(getattr(m, "_adapters", ()))
            if missing:
                return (f"{sorted(missing)} have no copy of a module that other rows' adapters train "
                        "(modules_to_save or trainable tokens)")
    return None


class LayerStack:
    """One LoRA layer's adapters for a batch, stacked along the rank (see the module docstring).

    ``a``: (R × in) ``A_cat``, ``b``: (out × R) ``B_cat``, ``mask``: (rows × 1 × R), ``M`` with each
    row's scaling on its adapter's block; ``slots``: the adapters in ``a``'s order."""

    def __init__(self, layer: nn.Module, names: list[str | None], masks: dict | None = None):
        lora_a, lora_b, scaling = layer.lora_A, layer.lora_B, layer.scaling
        self.slots = [n for n in dict.fromkeys(names) if n is not None and n in lora_a]
        a = [lora_a[n].weight for n in self.slots]
        self.a = torch.cat(a, 0)                                                     # R × in
        self.b = torch.cat([lora_b[n].weight for n in self.slots], 1)                # out × R
        ranks = tuple(w.shape[0] for w in a)
        key = (tuple(self.slots), ranks, tuple(float(scaling[n]) for n in self.slots),
               self.a.dtype, self.a.device)
        masks = {} if masks is None else masks
        if key not in masks:          # layers with the same adapters, ranks and scalings share M
            masks[key] = self._mask(names, *key)
        self.mask = masks[key]
        self.base_layer = layer.base_layer

    @staticmethod
    def _mask(names, slots, ranks, scales, dtype, device) -> torch.Tensor:
        """M (rows × 1 × R): row i holds its adapter's scaling on that adapter's block of columns."""
        owner = torch.repeat_interleave(torch.arange(len(slots)), torch.tensor(ranks))   # R: slot
        col_scale = torch.tensor(scales, dtype=dtype)[owner]                           # R
        row_slot = torch.tensor([slots.index(n) if n in slots else -1 for n in names])  # -1: none
        return ((row_slot[:, None] == owner[None, :]) * col_scale).unsqueeze(1).to(device)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``W x + ((x A_catᵀ) ⊙ M) B_catᵀ`` for x of shape (rows × T × in)."""
        y = self.base_layer(x, *args, **kwargs)
        mask = self.mask if x.shape[0] == self.mask.shape[0] and x.dim() == 3 else self._fit(x)
        h = torch.nn.functional.linear(x.to(self.a.dtype), self.a) * mask            # rows × T × R
        lora = torch.nn.functional.linear(h, self.b)                                 # rows × T × out
        return y + lora.to(y.dtype)

    def _fit(self, x: torch.Tensor) -> torch.Tensor:
        """M shaped for an input that is not (rows × T × in): (rows × in) or several sequences per
        prompt, which transformers lays out as each prompt's row repeated in place."""
        rows, width = self.mask.shape[0], self.mask.shape[-1]
        if x.dim() < 2 or x.shape[0] % rows:
            raise AdapterError(f"A LoRA layer got a batch of {x.shape[0]} rows for {rows} per-row "
                               "adapters, so the rows cannot be matched to their adapters.",
                               "generate with one sequence per prompt (num_beams=1, "
                               "num_return_sequences=1), or one adapter for all prompts")
        mask = self.mask.repeat_interleave(x.shape[0] // rows, dim=0)
        return mask.reshape(x.shape[0], *([1] * (x.dim() - 2)), width)


_MISSING = object()


@contextlib.contextmanager
def stacked_lora(model: nn.Module, names: list[str | None]):
    """Context: every LoRA layer of ``model`` computes row i with adapter ``names[i]`` (None: the base)
    through :class:`LayerStack`, whatever adapter is active; on exit (also on error) each layer's
    ``forward`` is what it was.  Check :func:`stack_reason` first.  A layer that holds none of the
    rows' adapters runs its base layer alone.  The stacks are copies made on entry: weights changed
    inside the block are not seen."""
    wanted = {n for n in names if n is not None}
    layers = [m for m in _lora_layers(model) or ()
              if isinstance(getattr(m, "lora_A", None), nn.ModuleDict)]
    saved: list[tuple[nn.Module, object]] = []
    masks: dict = {}
    try:
        with torch.no_grad():
            for m in layers:
                fwd = LayerStack(m, names, masks).forward if wanted & set(m.lora_A.keys()) else m.base_layer
                saved.append((m, m.__dict__.get("forward", _MISSING)))
                # an instance attribute, which nn.Module.__call__ finds before the class's forward
                # (object.__setattr__: nn.Module's would register base_layer a second time)
                object.__setattr__(m, "forward", fwd)
        yield
    finally:
        for m, old in reversed(saved):
            if old is _MISSING:
                m.__dict__.pop("forward", None)
            else:
                object.__setattr__(m, "forward", old)
