"""LoftQ initialisation of a QLoRA adapter, on any device (CPU included).

QLoRA starts its adapter at ΔW = 0 on top of a 4-bit base Q(W), so training first has to undo the
quantization error E = W − Q(W).  LoftQ (Li et al. 2023, Alg. 1) starts instead from a pair
(Q_T, B·A) chosen so that Q_T + s·B·A ≈ W (s = α/r):

    A, B ← 0;   for t = 1 … T:   Q_t = q(W − s·B·A);   s·B·A ← best rank-r approximation of W − Q_t

The base layer then holds Q_T (re-quantized: Q_T lies on the 4-bit grid, so it round-trips), and
``lora_A``/``lora_B`` hold A (r × in) and B (out × r).  peft's own ``init_lora_weights="loftq"``
hard-codes CUDA (it calls ``.cuda()``) and ignores s; this one runs the alternation of
:func:`lora_lab.core.lowrank.recover_lowrank` on the full-precision weights read back from the
model's checkpoint, honours any α/r, and keeps the best iterate, so a layer never ends up worse
than plain QLoRA.

Note: the adapter only makes sense on top of *its* Q_T.  ``save_adapter`` stores A and B; to use
them later, attach with ``init="loftq"`` again on the same base (the result is deterministic), or
export a merged model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from ...core.lowrank import recover_lowrank
from ...errors import SpecError
from .._peft import lora_layers

__all__ = ["loftq_initialize", "LoftQReport"]

LOFTQ_ITERS = 5


@dataclass(frozen=True, eq=False)
class LoftQReport:
    """What LoftQ changed, per adapted layer.

    ``table``: name, out, in, ``qlora_rel_error`` = ‖W − Q(W)‖/‖W‖ (where plain QLoRA starts) and
    ``loftq_rel_error`` = ‖W − Q_T − s·B·A‖/‖W‖ (where this adapter starts).
    """

    adapter: str
    rank: int
    scaling: float
    iters: int
    table: "pd.DataFrame"

    @property
    def mean_gain(self) -> float:
        """Mean share of the relative error that LoftQ removes (0 = none, 1 = all)."""
        t = self.table
        return float((1 - t["loftq_rel_error"] / t["qlora_rel_error"]).mean())

    def __repr__(self) -> str:
        t = self.table
        return (f"LoftQReport(adapter={self.adapter!r}, r={self.rank}, s={self.scaling:g}, "
                f"iters={self.iters}, layers={len(t)}, rel_error {t['qlora_rel_error'].mean():.4f}"
                f" -> {t['loftq_rel_error'].mean():.4f})")


def _checkpoint_folder(model) -> Path:
    from ..model.loading import base_source, resolve_source

    source = base_source(model)
    path = Path(str(resolve_source(source)))
    if path.is_dir():
        return path
    try:  # a hub id that from_pretrained read from the local cache
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(source), local_files_only=True,
                                      allow_patterns=["*.safetensors", "*.json"]))
    except Exception as exc:  # noqa: BLE001 - re-raised with the fix
        raise SpecError("AdapterSpec", "init", "loftq",
                        f"LoftQ needs the full-precision weights, and the checkpoint of {source!r} "
                        f"could not be found on disk ({exc})",
                        "load the base with lora_lab.load_model from a local folder or a cached "
                        "hub id, or use init='default'") from exc


def _layer_quant(layer):
    """(scheme, blocksize, double_quant) of a bitsandbytes ``Linear4bit``."""
    state = layer.weight.quant_state
    return state.quant_type, int(state.blocksize), state.nested


def _set_base(layer, Q: torch.Tensor, scheme: str, blocksize: int, double_quant: bool) -> None:
    """Replace a ``Linear4bit``'s weight by the 4-bit quantization of ``Q`` (out × in)."""
    import bitsandbytes as bnb

    from ..model.kbit import unpack_4bit_weights

    unpack_4bit_weights(layer)
    old = layer.weight
    new = bnb.nn.Params4bit(Q.to(torch.float32).contiguous(), requires_grad=False,
                            quant_type=scheme, blocksize=blocksize, compress_statistics=double_quant,
                            quant_storage=old.quant_storage)
    layer.weight = new.to(old.device)


def _start_error(W: torch.Tensor, layer, delta: torch.Tensor) -> float:
    """‖W − Q_stored − s·B·A‖/‖W‖ with the base as bitsandbytes actually stores it."""
    import bitsandbytes.functional as F

    Q = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float().view(W.shape)
    return (torch.linalg.vector_norm(W - Q - delta) / torch.linalg.vector_norm(W)).item()


@torch.no_grad()
def loftq_initialize(model, adapter: str = "default", iters: int = LOFTQ_ITERS) -> LoftQReport:
    """Give ``adapter`` (LoRA on a 4-bit base) its LoftQ start; return a :class:`LoftQReport`.

    For every adapted ``Linear4bit``: read W from the checkpoint, run ``iters`` LoftQ alternations
    at the adapter's rank r and scaling s, write Q_T into the base layer and A, B into the adapter.
    ``attach(model, AdapterSpec(init="loftq"))`` calls this; it is public for adapters attached
    some other way.
    """
    from ..quant.scan import clean_name, weight_loaders
    from ..quant.roundtrip import roundtrip

    base = model.get_base_model()
    if not getattr(base, "is_loaded_in_4bit", False):
        raise SpecError("AdapterSpec", "init", "loftq",
                        "LoftQ initialises an adapter against a 4-bit base, and this base is not "
                        "4-bit", "load it with lora_lab.load_model(source, quant='nf4'), or use "
                        "init='default' or 'pissa' on a full-precision base")
    loaders = weight_loaders(_checkpoint_folder(model))
    rows = []
    rank = scaling = None
    for name, module in lora_layers(model, adapter):
        layer = module.get_base_layer()
        if type(layer).__name__ != "Linear4bit":
            continue
        key = clean_name(name + ".weight")
        if key not in loaders:
            raise SpecError("AdapterSpec", "init", "loftq",
                            f"the checkpoint has no tensor {key!r} for layer {name}",
                            "load the base from the checkpoint it was saved as, or use "
                            "init='default'")
        W = loaders[key]().float()
        rank, scaling = module.r[adapter], float(module.scaling[adapter])
        scheme, blocksize, dq = _layer_quant(layer)
        res = recover_lowrank(W, roundtrip(scheme, blocksize, dq), (rank,), scheme=scheme,
                              loftq_iters=iters, scaling=scaling)
        fix = res.corrections[rank]
        if fix.base is not None:
            _set_base(layer, fix.base, scheme, blocksize, dq)
        A, B = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        A.copy_(fix.A.to(A.dtype))
        B.copy_(fix.B.to(B.dtype))
        rows.append({"name": clean_name(name), "out": W.shape[0], "in": W.shape[1],
                     "qlora_rel_error": res.quant_rel_error,
                     "loftq_rel_error": _start_error(W, layer, fix.delta())})
    if not rows:
        raise SpecError("AdapterSpec", "init", "loftq",
                        f"adapter {adapter!r} adapts no 4-bit linear layer",
                        "target linear layers of a 4-bit base (e.g. target_modules='all-linear')")
    return LoftQReport(adapter, rank, scaling, iters, pd.DataFrame(rows))
