"""The effect of quantization on outputs: logits of a quantized model against full precision.

The quantized model is *simulated*: each linear weight W is replaced, in place and temporarily, by
its round trip Q(W) (bitsandbytes quantize + dequantize, :func:`lora_lab.hf.quant.roundtrip`).
That is what a bitsandbytes ``Linear4bit`` computes (dequantize, then a matmul in the compute
dtype), so the logits match a real QLoRA base up to the compute dtype, on CPU or GPU, without
reloading the model.  The weights are restored before the function returns, even on error.

Measured on the same batches: the mean |Δlogit| and the mean per-token KL(p_fp ‖ p_q) in nats,
and the share of tokens whose top-1 prediction is unchanged.  Optionally, per decoder layer
(quantizing one layer at a time), and with a rank-r correction: SVD of W − Q(W), or LoftQ
(Li et al. 2023), whose base Q_T + s·B·A is what a LoftQ-initialised QLoRA adapter starts from.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable

import torch

from ...core.lowrank import recover_lowrank
from ...errors import LoraLabError
from .scan import clean_name, layer_and_module, module_items
from .roundtrip import roundtrip

__all__ = ["quantized_output_error", "OutputError"]


@dataclass(frozen=True, eq=False)
class OutputError:
    """Logit error of the quantized model.  ``table`` has one row per variant: ``"quantized"``
    (every linear weight), ``"layer N"`` (only decoder layer N), ``"svd rR"`` / ``"loftq rR"``
    (every weight quantized, plus the rank-R correction), with columns variant, logits_mae,
    kl, top1_agreement."""

    scheme: str
    blocksize: int
    double_quant: bool
    tokens: int
    logits_mae: float
    kl: float
    top1_agreement: float
    table: "object"

    def __repr__(self) -> str:
        return (f"OutputError({self.scheme} bs={self.blocksize} on {self.tokens} tokens: "
                f"mean|Δlogit|={self.logits_mae:.4g} KL={self.kl:.4g} nats "
                f"top-1 kept={self.top1_agreement:.1%})\n"
                + self.table.to_string(index=False, float_format=lambda x: f"{x:.4g}"))

    def _repr_html_(self) -> str:
        return (f"<p><code>{repr(self).splitlines()[0]}</code></p>"
                + self.table.to_html(index=False, float_format="%.4g"))


def _batches(data, max_batches: int, device) -> list[dict]:
    """input_ids (B × T), a dict with input_ids (and attention_mask), or an iterable of those."""
    if isinstance(data, torch.Tensor) or isinstance(data, dict):
        data = [data]
    out = []
    for batch in data if isinstance(data, Iterable) else []:
        if isinstance(batch, torch.Tensor):
            batch = {"input_ids": batch}
        if not isinstance(batch, dict) or "input_ids" not in batch:
            break
        ids = batch["input_ids"]
        ids = ids[None] if ids.ndim == 1 else ids
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else (mask[None] if mask.ndim == 1 else mask)
        out.append({"input_ids": ids.to(device), "attention_mask": mask.to(device)})
        if len(out) == max_batches:
            break
    if not out:
        raise LoraLabError(f"quantized_output_error could not read batches from {type(data).__name__}.",
                           "pass token ids (a LongTensor B × T), a dict with 'input_ids', or a "
                           "list of those")
    return out


@torch.no_grad()
def _logits(model, batches) -> list[torch.Tensor]:
    return [model(**b).logits.float() for b in batches]


def _compare(ref: list[torch.Tensor], got: list[torch.Tensor], batches) -> dict:
    """mean |Δlogit|, mean KL(p_ref ‖ p_got) and top-1 agreement over the unmasked tokens."""
    mae = kl = agree = 0.0
    n = 0
    for z, zq, b in zip(ref, got, batches):
        keep = b["attention_mask"].bool()
        z, zq = z[keep], zq[keep]  # tokens × vocab
        logp, logq = torch.log_softmax(z, -1), torch.log_softmax(zq, -1)
        kl += (logp.exp() * (logp - logq)).sum().item()
        mae += (z - zq).abs().mean(-1).sum().item()
        agree += (z.argmax(-1) == zq.argmax(-1)).sum().item()
        n += z.shape[0]
    return dict(logits_mae=mae / n, kl=kl / n, top1_agreement=agree / n)


@contextmanager
def _replaced(params: dict[str, torch.nn.Parameter], new: dict[str, torch.Tensor]):
    """Temporarily set ``params[name].data`` to ``new[name]``; always restore."""
    saved = {n: params[n].data for n in new}
    try:
        for n, t in new.items():
            params[n].data = t.to(saved[n].dtype)
        yield
    finally:
        for n, t in saved.items():
            params[n].data = t


def quantized_output_error(model_source, data, scheme: str = "nf4", blocksize: int = 64,
                           double_quant: bool = False, per_layer: bool = True,
                           ranks: tuple[int, ...] = (), loftq_iters: int = 0,
                           scaling: float = 1.0, max_batches: int = 4) -> OutputError:
    """Logit error of ``model_source`` quantized with ``scheme``, against full precision.

    ``model_source``: a loaded full-precision model, or anything :func:`lora_lab.load_model`
    accepts (it is then loaded on the CPU in fp32).  ``data``: token ids (B × T), a dict with
    ``input_ids`` (and ``attention_mask``), or a list of those; at most ``max_batches`` are used.
    ``per_layer`` adds one row per decoder layer quantized alone.  For each rank in ``ranks`` a row
    with every weight quantized plus its best rank-r correction (SVD of W − Q(W)), and with
    ``loftq_iters`` > 0 a LoftQ row too (LoRA scaling ``scaling`` = α/r).  The model's weights are
    restored before returning.
    """
    import pandas as pd

    if not isinstance(model_source, torch.nn.Module):
        from ..model.loading import load_model

        model_source, _ = load_model(model_source, device="cpu")
    model = model_source
    items = dict(module_items(model))  # refuses an already quantized model
    params = {clean_name(n): p for n, p in model.named_parameters() if clean_name(n) in items}
    device = next(model.parameters()).device
    batches = _batches(data, max_batches, device)
    rt = roundtrip(scheme, blocksize, double_quant)
    was_training = model.training
    model.eval()
    try:
        ref = _logits(model, batches)
        quant = {n: rt(p.data) for n, p in params.items()}
        rows = []
        with _replaced(params, quant):
            rows.append(dict(variant="quantized", **_compare(ref, _logits(model, batches), batches)))
        layers = sorted({layer_and_module(n)[0] for n in params} - {None}) if per_layer else []
        for layer in layers:
            sub = {n: q for n, q in quant.items() if layer_and_module(n)[0] == layer}
            with _replaced(params, sub):
                rows.append(dict(variant=f"layer {layer}",
                                 **_compare(ref, _logits(model, batches), batches)))
        rows += _corrected_rows(params, rt, ranks, loftq_iters, scaling, model, ref, batches, scheme)
    finally:
        model.train(was_training)
    table = pd.DataFrame(rows, columns=["variant", "logits_mae", "kl", "top1_agreement"])
    head = rows[0]
    return OutputError(scheme=scheme, blocksize=blocksize, double_quant=double_quant,
                       tokens=int(sum(b["attention_mask"].sum() for b in batches)),
                       logits_mae=head["logits_mae"], kl=head["kl"],
                       top1_agreement=head["top1_agreement"], table=table)


def _corrected_rows(params, rt, ranks, loftq_iters, scaling, model, ref, batches, scheme):
    """Rows for every weight quantized plus its rank-r correction: SVD, then LoftQ if asked."""
    rows = []
    for r in ranks:
        for kind, iters in (("svd", 0), ("loftq", loftq_iters)):
            if kind == "loftq" and not iters:
                continue
            new = {}
            for n, p in params.items():
                res = recover_lowrank(p.data, rt, (min(r, *p.shape),), scheme=scheme,
                                      loftq_iters=iters, scaling=scaling)
                c = res.corrections[res.ranks[0]]
                base = rt(p.data) if c.base is None else c.base
                new[n] = base.float() + c.delta()
            with _replaced(params, new):
                rows.append(dict(variant=f"{kind} r{r}",
                                 **_compare(ref, _logits(model, batches), batches)))
    return rows
