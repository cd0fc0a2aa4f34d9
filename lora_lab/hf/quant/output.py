"""The effect of quantization on outputs: logits of a quantized model against full precision.

The quantized model is *simulated* without reloading it, on CPU or GPU; the weights are restored
before the function returns, even on error.

* 4-bit (and ``int8-blockwise``, ``int4``): each linear weight W is replaced, in place and
  temporarily, by its round trip Q(W) (:func:`lora_lab.hf.quant.roundtrip.roundtrip`).  That is what
  a bitsandbytes ``Linear4bit`` computes (dequantize, then a matmul in the compute dtype), so the
  logits match a real QLoRA base up to the compute dtype.
* ``int8`` (LLM.int8(), as ``load_model(quant="int8")``): each linear layer's output is replaced by
  bitsandbytes' own LLM.int8() matmul, ``bitsandbytes.matmul`` with the int8 rows of W and the
  outlier threshold transformers uses (6.0), which is what ``Linear8bitLt`` runs in eval mode: the
  inputs are rounded to int8 per token too, except the columns holding a value above the threshold,
  which stay unrounded (Dettmers et al. 2022, §3.2).  The logits equal the real int8 model's.
  That input rounding is most of the error: on SmolLM2-135M, weights alone give a KL of ~0.006 nats,
  the full LLM.int8() matmul ~0.05.

Measured on the same batches: the mean |Δlogit| and the mean per-token KL(p_fp ‖ p_q) in nats,
and the share of tokens whose top-1 prediction is unchanged.  Optionally, per decoder layer
(quantizing one layer at a time), and with a rank-r correction: SVD of W − Q(W), or LoftQ
(Li et al. 2023), whose base Q_T + s·B·A is what a LoftQ-initialised QLoRA adapter starts from
(with ``int8``, s·B·A runs in full precision beside the int8 matmul, as a LoRA layer does).

Weights already rounded to a 4-bit grid (a GGUF Q4 checkpoint converted back to fp32; see
``QuantScan.note``) can rank schemes differently on logits than on weight error: measure here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ...core.lowrank import recover_lowrank
from ...core.quant import canonical_scheme
from ...errors import LoraLabError
from .roundtrip import roundtrip
from .scan import clean_name, layer_and_module, module_items

__all__ = ["OutputError", "quantized_output_error"]


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
    table: object

    def __repr__(self) -> str:
        how = ("LLM.int8()" if self.scheme == "int8" else
               f"bs={self.blocksize}{' +dq' if self.double_quant else ''}")
        return (f"OutputError({self.scheme} {how} on {self.tokens} tokens: "
                f"mean|Δlogit|={self.logits_mae:.4g} KL={self.kl:.4g} nats "
                f"top-1 kept={self.top1_agreement:.1%})\n"
                + self.table.to_string(index=False, float_format=lambda x: f"{x:.4g}"))

    def _repr_html_(self) -> str:
        return (f"<p><code>{repr(self).splitlines()[0]}</code></p>"
                + self.table.to_html(index=False, float_format="%.4g"))


def _batches(data, max_batches: int, device) -> list[dict]:
    """input_ids (B × T), a mapping with input_ids (and attention_mask) such as a tokenizer's
    output, or an iterable of those."""
    if isinstance(data, (torch.Tensor, Mapping)):
        data = [data]
    out = []
    for batch in data if isinstance(data, Iterable) else []:
        if isinstance(batch, torch.Tensor):
            batch = {"input_ids": batch}
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
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
    return {"logits_mae": mae / n, "kl": kl / n, "top1_agreement": agree / n}


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


def _llm_int8_threshold() -> float:
    """The outlier threshold of the int8 models :func:`lora_lab.load_model` makes (6.0)."""
    from ...specs import QuantSpec
    from ..model.loading import bnb_config

    return float(bnb_config(QuantSpec(bits=8), "cpu").llm_int8_threshold)


@contextmanager
def _llm_int8(modules: dict[str, torch.nn.Module], new: dict[str, tuple], threshold: float,
              rows: dict):
    """While active, module ``modules[n]`` returns LLM.int8()'s output for each ``n`` in ``new``:
    ``bitsandbytes.matmul`` of its input with the int8 rows of ``new[n][0]`` (quantized from fp16
    by ``int8_vectorwise_quant``, as ``Int8Params`` does: W itself, or a LoftQ base that is already
    on the int8 grid), in eval mode (inputs rounded to int8, outlier columns above ``threshold``
    kept), plus ``x @ new[n][1]ᵀ`` in full precision when a correction is given.  ``rows`` caches
    the int8 rows per name across variants (fp16 rounding is slow on CPUs)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    def hook_for(name: str, base: torch.Tensor, delta: torch.Tensor | None):
        if name not in rows or rows[name][0] is not base:
            rows[name] = (base, *F.int8_vectorwise_quant(base.to(torch.float16).contiguous())[:2])
        _, cb, scb = rows[name]

        def hook(module, args, _out):
            state = bnb.MatmulLtState()
            state.CB, state.SCB, state.threshold = cb, scb, threshold
            state.has_fp16_weights, state.is_training = False, False
            x = args[0]
            y = bnb.matmul(x, cb, state=state, bias=module.bias)
            return y if delta is None else y + x @ delta.to(x.dtype).T
        return hook

    handles = [modules[n].register_forward_hook(hook_for(n, *new[n])) for n in new]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _simulated(sim: dict, new: dict[str, tuple]):
    """The quantized model for one variant: ``new[n]`` = (base, correction or None), the base from
    ``sim["base"]``.  LLM.int8() swaps layer outputs, the other schemes swap weights (base + delta)."""
    if sim["threshold"] is not None:
        return _llm_int8(sim["modules"], new, sim["threshold"], sim["rows"])
    return _replaced(sim["params"],
                     {n: b if d is None else b.float() + d for n, (b, d) in new.items()})


def _linear_modules(model, params) -> dict[str, torch.nn.Module]:
    """``{clean weight name: the nn.Linear that owns it}`` for the weights in ``params``."""
    owners = {}
    for name, module in model.named_modules():
        key = clean_name(name + ".weight")
        if key in params and getattr(module, "weight", None) is params[key]:
            owners[key] = module
    odd = [f"{n} ({type(owners[n]).__name__})" if n in owners else n for n in params
           if not isinstance(owners.get(n), torch.nn.Linear)]
    if odd:
        raise LoraLabError(f"LLM.int8() can be simulated on nn.Linear layers only, not {odd[0]}.",
                           "load it with ll.load_model(source, quant='int8') and compare its "
                           "logits, or pick another scheme")
    return owners


def quantized_output_error(model_source, data, scheme: str = "nf4", blocksize: int = 64,
                           double_quant: bool = False, per_layer: bool = True,
                           ranks: tuple[int, ...] = (), loftq_iters: int = 0,
                           scaling: float = 1.0, max_batches: int = 4) -> OutputError:
    """Logit error of ``model_source`` quantized with ``scheme``, against full precision.

    ``model_source``: a loaded full-precision model, or anything :func:`lora_lab.load_model`
    accepts (it is then loaded on the CPU in fp32).  ``data``: token ids (B × T), a dict with
    ``input_ids`` (and ``attention_mask``) such as a tokenizer's output, or a list of those; at
    most ``max_batches`` are used.  ``scheme="int8"`` is LLM.int8() with its int8 inputs (module
    docstring): what ``load_model(quant="int8")`` gives.
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
    scheme = canonical_scheme(scheme)
    int8 = scheme == "int8"   # LLM.int8() quantizes W itself, inside the matmul (_llm_int8)
    sim = {"params": params, "threshold": _llm_int8_threshold() if int8 else None, "rows": {},
           "modules": _linear_modules(model, params) if int8 else {},
           "base": (lambda w: w) if int8 else rt}
    was_training = model.training
    model.eval()
    try:
        ref = _logits(model, batches)
        quant = {n: (sim["base"](p.data), None) for n, p in params.items()}
        rows = []
        with _simulated(sim, quant):
            rows.append(dict(variant="quantized", **_compare(ref, _logits(model, batches), batches)))
        layers = sorted({layer_and_module(n)[0] for n in params} - {None}) if per_layer else []
        for layer in layers:
            sub = {n: q for n, q in quant.items() if layer_and_module(n)[0] == layer}
            with _simulated(sim, sub):
                rows.append(dict(variant=f"layer {layer}",
                                 **_compare(ref, _logits(model, batches), batches)))
        rows += _corrected_rows(sim, rt, ranks, loftq_iters, scaling, model, ref, batches, scheme)
    finally:
        model.train(was_training)
    table = pd.DataFrame(rows, columns=["variant", "logits_mae", "kl", "top1_agreement"])
    head = rows[0]
    return OutputError(scheme=scheme, blocksize=blocksize, double_quant=double_quant,
                       tokens=int(sum(b["attention_mask"].sum() for b in batches)),
                       logits_mae=head["logits_mae"], kl=head["kl"],
                       top1_agreement=head["top1_agreement"], table=table)


def _corrected_rows(sim, rt, ranks, loftq_iters, scaling, model, ref, batches, scheme):
    """Rows for every weight quantized plus its rank-r correction: SVD, then LoftQ if asked."""
    params, rows = sim["params"], []
    for r in ranks:
        for kind, iters in (("svd", 0), ("loftq", loftq_iters)):
            if kind == "loftq" and not iters:
                continue
            new = {}
            for n, p in params.items():
                res = recover_lowrank(p.data, rt, (min(r, *p.shape),), scheme=scheme,
                                      loftq_iters=iters, scaling=scaling)
                c = res.corrections[res.ranks[0]]
                new[n] = (sim["base"](p.data) if c.base is None else c.base, c.delta())
            with _simulated(sim, new):
                rows.append(dict(variant=f"{kind} r{r}",
                                 **_compare(ref, _logits(model, batches), batches)))
    return rows
