"""Plan before you train: will it fit?  :func:`estimate_memory` for full FT, LoRA and QLoRA.

The model is never loaded.  Its config is instantiated on PyTorch's ``meta`` device (shapes, no
storage; :func:`~lora_lab.hf.model.facts.model_facts`), so the parameter counts are exact and an 8B
or 70B config costs no more RAM than the imports.  The adapter's trainable parameters are counted
on that meta model with the same :func:`~lora_lab.hf.model.inspect.resolve_targets` and
:func:`~lora_lab.inspect_model` that :func:`lora_lab.attach` uses
(:mod:`~lora_lab.hf.model.adapter_count`); the memory terms are :mod:`lora_lab.core.memory`'s
formulas.

What a trained parameter costs depends on the chip (:mod:`lora_lab.core.recipes`), and the
estimate says which recipe it assumed (``est.recipes``, its repr and the designer):

* full FT on a GPU without bf16 (a T4, fp16): fp32 master weights + fp32 gradients + fp32 AdamW
  = 4 + 4 + 8 = 16 bytes/param, plus fp16 weight copies in the forward: pure fp16 does not train,
  because ``GradScaler.unscale_`` refuses fp16 gradients;
* full FT where bf16 is native (A100, A10G, L4, H100): pure bf16, 2 + 2 + 4 = 8 bytes/param;
* full FT on the CPU: fp32, 16 bytes/param; where the chip has native bf16 and the model's hidden
  size is >= 512 (:func:`~lora_lab.hf.model.device.default_train_precision`, what
  ``load_model(dtype="auto")`` and ``TrainSpec(precision="auto")`` pick there), pure bf16 as above;
* adapters (LoRA, QLoRA, ...) everywhere: fp32 adapter weights, gradients and AdamW (peft's
  ``autocast_adapter_dtype=True``), 16 bytes per *adapter* parameter, on a frozen base.

::

    est = lora_lab.estimate_memory("meta-llama/Llama-3.1-8B", lora_lab.AdapterSpec(r=16),
                                   quant="nf4", seq_len=1024, device="T4")
    est.verdict(), est.table()          # "fits" / "does not fit", and a GiB breakdown per scenario
    lora_lab.estimate_memory("HuggingFaceTB/SmolLM2-135M", device="cpu")   # full FT in CPU RAM
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field, replace

import pandas as pd
import torch

from ...core import memory as mem
from ...core.recipes import Recipe, adapter_recipe, full_ft_recipe
from ...errors import SpecError
from ...specs import AdapterSpec, QuantSpec
from .adapter_count import AdapterCount, count_adapter  # noqa: F401  (re-exported)
from .facts import ModelFacts, model_facts
from .plan_args import (  # noqa: F401  (system_ram_bytes re-exported)
    SEQ_LEN_DEFAULT,
    TRAIN_DEFAULTS,
    check_args,
    planned_loss_chunk,
    resolve_device,
    resolve_precision,
    system_ram_bytes,
)

__all__ = ["FULL_FT", "TERMS", "MemoryEstimate", "count_adapter", "estimate_from_facts",
           "estimate_memory", "system_ram_bytes"]

TERMS = ("base_weights", "quant_constants", "adapter_weights", "gradients", "optimizer_states",
         "activations", "logits", "allocator_overhead", "cuda_context")


# ----------------------------------------------------------------------------- the estimate
FULL_FT = "full FT"


def _label(spec: AdapterSpec) -> str:
    if spec.method != "lora":
        return {"prefix": "prefix", "prompt": "prompt", "ia3": "IA3"}[spec.method]
    return "DoRA" if spec.use_dora else ("rsLoRA" if spec.use_rslora else "LoRA")


@dataclass(frozen=True)
class MemoryEstimate:
    """The estimated memory of one training setup on a GPU (or in CPU RAM), for full FT, the adapter
    and the adapter on a quantized base, side by side.  Bytes throughout; :meth:`table` gives GiB.

    ``scenarios`` maps a scenario name to its terms (see :mod:`lora_lab.core.memory`); each term is
    what is allocated at the step's peak, so ``gradients`` is 0 when the peak is the end of the
    forward pass (``gradients_total`` and the table's last row give all of them).  ``chosen`` is
    the scenario that matches the arguments: ``"full FT"`` for ``adapter=None``, the quantized one
    when ``quant`` was given, else the adapter's.  ``spec`` is the adapter of the adapter scenarios
    (the default :class:`~lora_lab.AdapterSpec` beside full FT) and ``adapter_file_bytes`` its
    file.  ``need(s)`` is what the device must hold to train (reserved peak + CUDA context, or the
    process's libraries on the CPU) and ``merge_need(s)`` what merging the adapter afterwards needs.
    ``recipes`` maps each scenario to the :class:`~lora_lab.core.recipes.Recipe` it assumed (in
    which dtype the trained weights, gradients and AdamW moments live); ``recipe_text()`` says it.
    """

    model: str
    device: str
    device_bytes: int
    chosen: str
    scenarios: dict = field(repr=False)
    trainable: dict = field(repr=False)
    total_params: int
    adapter_file_bytes: int
    spec: AdapterSpec
    quant: QuantSpec | None
    batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    optimizer: str
    precision: str = "bf16"
    grad_accum: int = 1
    recipes: dict = field(default_factory=dict, repr=False)   # scenario -> core.recipes.Recipe
    loss_chunk: int | None = None     # the adapter rows' loss chunk (tokens); None: the full loss

    @property
    def breakdown(self) -> dict[str, float]:
        return dict(self.scenarios[self.chosen])

    @property
    def device_text(self) -> str:
        """``"T4 (16 GiB)"``, ``"CPU system RAM (62.8 GiB)"``, or ``"24 GiB"`` for a number."""
        size = f"{self.device_bytes / mem.GIB:.3g} GiB"
        return size if self.device == size else f"{self.device} ({size})"

    @property
    def on_cpu(self) -> bool:
        return self.device == mem.CPU

    def peak_allocated(self, scenario: str | None = None) -> float:
        """What ``torch.cuda.max_memory_allocated`` should report for a training step."""
        t = self.scenarios[scenario or self.chosen]
        return sum(t[k] for k in TERMS if k not in ("allocator_overhead", "cuda_context"))

    def peak_reserved(self, scenario: str | None = None) -> float:
        """What ``torch.cuda.max_memory_reserved`` should report for a training step."""
        return self.peak_allocated(scenario) + self.scenarios[scenario or self.chosen]["allocator_overhead"]

    def need(self, scenario: str | None = None) -> float:
        """Device memory training needs: the reserved peak plus the CUDA context (on the CPU: the
        peak resident size, libraries included)."""
        t = self.scenarios[scenario or self.chosen]
        return self.peak_reserved(scenario) + t["cuda_context"]

    def merge_need(self, scenario: str | None = None) -> float:
        """Device memory a merge on the GPU after training needs (see ``merge_peak``)."""
        t = self.scenarios[scenario or self.chosen]
        return t["merge_peak"] + t["cuda_context"]

    @property
    def total(self) -> float:
        return self.need()

    def verdict(self, scenario: str | None = None) -> str:
        """``"fits"`` (under 90% of the device), ``"tight"`` or ``"does not fit"``, for training."""
        return mem.verdict(self.need(scenario), self.device_bytes)

    def merge_verdict(self, scenario: str | None = None) -> str:
        return mem.verdict(self.merge_need(scenario), self.device_bytes)

    def table(self) -> pd.DataFrame:
        """GiB per term at the peak (rows) and scenario (columns), the totals, and all gradients."""
        rows = {s: {k: t[k] / mem.GIB for k in TERMS} for s, t in self.scenarios.items()}
        df = pd.DataFrame(rows).reindex(list(TERMS))
        df.loc["peak allocated"] = [self.peak_allocated(s) / mem.GIB for s in self.scenarios]
        df.loc["peak reserved"] = [self.peak_reserved(s) / mem.GIB for s in self.scenarios]
        df.loc["device need"] = [self.need(s) / mem.GIB for s in self.scenarios]
        df.loc["merge need"] = [self.merge_need(s) / mem.GIB for s in self.scenarios]
        df.loc["gradients (all, after backward)"] = [t["gradients_total"] / mem.GIB
                                                     for t in self.scenarios.values()]
        if self.on_cpu:
            df = df.rename(index={"cuda_context": "python_and_libraries"})
        return df

    def verdicts(self) -> dict[str, str]:
        return {s: self.verdict(s) for s in self.scenarios}

    @property
    def recipe(self) -> Recipe | None:
        """The recipe of the chosen scenario."""
        return self.recipes.get(self.chosen)

    def recipe_text(self, scenario: str | None = None) -> str:
        """``"full FT: fp32 master weights + fp16 autocast + loss scaling, 4 + 4 + 8 = 16 B/param
        (...)"``: how ``scenario``'s trained parameters are held, and why."""
        s = scenario or self.chosen
        r = self.recipes.get(s)
        return f"{s}: {r.describe(self.optimizer)}" if r else ""

    def recipes_text(self) -> str:
        """Full FT's recipe and the adapters' (shared by the adapter scenarios), one line each."""
        full = self.recipe_text(FULL_FT)
        adapters = [s for s in self.recipes if s != FULL_FT]
        if not adapters:
            return full
        r = self.recipes[adapters[0]].describe(self.optimizer)
        return f"{full}\n{' and '.join(adapters)}: {r}"

    def _setup(self) -> str:
        return (f"batch {self.batch_size} × {self.seq_len} tokens"
                + (f" × {self.grad_accum} accumulated" if self.grad_accum > 1 else "")
                + f", checkpointing {'on' if self.gradient_checkpointing else 'off'}, "
                  f"{self.precision}, {self.optimizer}")

    def _full_ft_short(self) -> str:
        r = self.recipes.get(FULL_FT)
        return f"; full FT as {r.name}, {r.sum_text(self.optimizer)}" if r else ""

    def __repr__(self) -> str:
        parts = ", ".join(f"{s}={self.need(s) / mem.GIB:.2f} GiB ({self.verdict(s)})"
                          for s in self.scenarios)
        return (f"MemoryEstimate({self.model}, {self._setup()}, on {self.device_text}: {parts}; "
                f"chosen={self.chosen}{self._full_ft_short()})")

    def _repr_html_(self) -> str:
        head = f"<b>{self.model}</b> on {self.device_text}, {self._setup()}<br>"
        verdicts = " · ".join(f"{s}: <b>{v}</b>" for s, v in self.verdicts().items())
        recipes = "".join(f"<br><small>{html.escape(line)}</small>"
                          for line in self.recipes_text().splitlines())
        return head + verdicts + recipes + self.table().round(2).to_html()


def estimate_memory(model, adapter: AdapterSpec | None = None, quant=None,
                    batch_size: int = TRAIN_DEFAULTS["batch_size"], seq_len: int = SEQ_LEN_DEFAULT,
                    gradient_checkpointing: bool = TRAIN_DEFAULTS["gradient_checkpointing"],
                    optimizer: str = TRAIN_DEFAULTS["optimizer"], device="T4", *,
                    padded: bool | None = None, precision: str = TRAIN_DEFAULTS["precision"],
                    grad_accum: int = TRAIN_DEFAULTS["grad_accum"],
                    chunked_loss=TRAIN_DEFAULTS["chunked_loss"],
                    loss_chunk_size: int = TRAIN_DEFAULTS["loss_chunk_size"]) -> MemoryEstimate:
    """Estimate the memory of training ``adapter`` on ``model``, before loading anything.

    ``model``: a loaded model, a ``PretrainedConfig``, a local folder, a builtin name or a hub id
    (only its config.json is read).  ``adapter``: the :class:`~lora_lab.AdapterSpec`, or ``None``
    for full fine-tuning (every weight trained; the adapter scenarios then show the default
    ``AdapterSpec()`` beside it).  For a model loaded by :func:`lora_lab.load_model`,
    ``adapter=None`` and ``quant=None`` mean the attached (active) adapter, if any, and the
    quantization it was loaded with.  ``quant``: a :class:`~lora_lab.QuantSpec` or
    ``"nf4"``/``"fp4"``/``"int8"``; the quantized scenario uses it (NF4 with double quantization
    when None).  ``device``: ``"T4"``, ``"L4"``, ``"A10G"``, ``"A100-40GB"``, ``"A100-80GB"``,
    ``"H100"``, ``"cpu"`` (this machine's total RAM, for training on the CPU) or the memory in GiB
    (``24`` = 24·2³⁰ bytes).  ``precision``: ``"auto"`` (fp16 on a T4, bf16 on other GPUs; on the
    CPU bf16 where this chip has native bf16 and the hidden size is >= 512, as ``lora_lab.train``
    and ``load_model(dtype="auto")`` pick it there, else fp32),
    ``"fp32"``, ``"fp16"`` or ``"bf16"``: the dtype of the frozen weights and the activations.  It
    also picks full FT's recipe (:mod:`lora_lab.core.recipes`): fp16 trains fp32 master weights
    under fp16 autocast (4 + 4 + 8 = 16 bytes/param for weights, gradients and AdamW), bf16 trains
    pure bf16 (2 + 2 + 4 = 8), fp32 trains fp32 (16); adapters are fp32 (16 per adapter param).

    ``chunked_loss``: True, False or ``"auto"`` (on for vocabularies ≥ 32k), as in
    :class:`~lora_lab.TrainSpec`: the chunked loss holds one chunk of ``loss_chunk_size`` tokens
    of logits instead of all of them (``est.loss_chunk``; ``min(C, B·T)·V·c`` bytes + a 16 MiB block).

    ``batch_size``, ``gradient_checkpointing``, ``optimizer``, ``precision``, ``grad_accum`` and
    ``chunked_loss`` default to :class:`~lora_lab.TrainSpec`'s defaults and ``seq_len`` to
    :class:`~lora_lab.DataSpec`'s ``max_length``, so the defaults estimate a default training run.

    Returns a :class:`MemoryEstimate` with full FT, the adapter on a 16-bit base and on the
    quantized base side by side, and the recipe each assumed (``est.recipes``); the formulas are in
    :mod:`lora_lab.core.memory`.
    """
    if isinstance(model, torch.nn.Module):       # a loaded model: its own adapter and quantization
        adapter = adapter if adapter is not None else _attached_spec(model)
        quant = quant if quant is not None else getattr(model, "lora_lab_quant", None)
    if adapter is not None and not isinstance(adapter, AdapterSpec):
        raise SpecError("estimate_memory", "adapter", adapter,
                        "adapter must be an AdapterSpec, or None for full fine-tuning",
                        "pass lora_lab.AdapterSpec(r=8)")
    return estimate_from_facts(model_facts(model), adapter, quant, batch_size, seq_len,
                               gradient_checkpointing, optimizer, device, padded=padded,
                               precision=precision, grad_accum=grad_accum, chunked_loss=chunked_loss,
                               loss_chunk_size=loss_chunk_size)


def _attached_spec(model) -> AdapterSpec | None:
    specs = getattr(model, "lora_lab_specs", None) or {}
    active = getattr(model, "active_adapter", None)
    active = active if isinstance(active, str) else next(iter(specs), None)
    return specs.get(active)


def estimate_from_facts(facts: ModelFacts, spec: AdapterSpec | None, quant=None,
                        batch_size: int = TRAIN_DEFAULTS["batch_size"], seq_len: int = SEQ_LEN_DEFAULT,
                        gradient_checkpointing: bool = TRAIN_DEFAULTS["gradient_checkpointing"],
                        optimizer: str = TRAIN_DEFAULTS["optimizer"], device="T4", *,
                        padded: bool | None = None, precision: str = TRAIN_DEFAULTS["precision"],
                        grad_accum: int = TRAIN_DEFAULTS["grad_accum"],
                        chunked_loss=TRAIN_DEFAULTS["chunked_loss"],
                        loss_chunk_size: int = TRAIN_DEFAULTS["loss_chunk_size"]) -> MemoryEstimate:
    """:func:`estimate_memory` on :class:`ModelFacts` already read (what a widget update calls);
    ``spec=None`` is full fine-tuning."""
    q = QuantSpec.parse(quant)
    if spec is None and q is not None:
        raise SpecError("estimate_memory", "adapter", None,
                        "full fine-tuning (adapter=None) trains every base weight, and a "
                        f"{q.name} base keeps its weights frozen in {q.bits} bits",
                        "pass adapter=lora_lab.AdapterSpec(r=8) to train an adapter on the "
                        "quantized base (QLoRA), or quant=None for full fine-tuning")
    check_args(batch_size, seq_len, optimizer, precision, grad_accum)
    dev_label, dev_bytes = resolve_device(device)
    prec = resolve_precision(precision, q, dev_label, facts.arch.hidden)
    adapter = spec if spec is not None else AdapterSpec()
    count = count_adapter(facts, adapter)
    loss = dict(chunk_size=loss_chunk_size, vocab=facts.arch.vocab)
    setup = {"batch": batch_size, "seq": seq_len, "checkpointing": gradient_checkpointing,
             "optimizer": optimizer, "padded": padded, "grad_accum": grad_accum,
             "loss_chunk": planned_loss_chunk(chunked_loss, **loss)}       # full FT's loss
    adapter_chunk = planned_loss_chunk(chunked_loss, adapter=adapter, **loss)  # prefix/prompt: the full loss
    est = _estimate(facts, adapter, q, count, setup, dev_label, dev_bytes, prec, adapter_chunk)
    return replace(est, chosen=FULL_FT) if spec is None else est


def _estimate(facts, spec, q, count, setup, dev_label, dev_bytes, prec, adapter_chunk):
    qs = q or QuantSpec()
    c = prec[1]
    full_r, adapter_r = full_ft_recipe(prec[0]), adapter_recipe(prec[0])
    layout = mem.TrainableLayout(params=count.params, param_bytes=adapter_r.weight_bytes,
                                 modules=count.modules, dropout=spec.dropout > 0, dora=spec.use_dora,
                                 extra_tokens=spec.num_virtual_tokens if spec.method == "prompt" else 0,
                                 ia3=count.ia3_modules)
    # autocast copies every linear weight it multiplies (the LM head too) to 16 bits
    copies = facts.linear_params + facts.arch.vocab * facts.arch.hidden if full_r.master_weights else 0
    full = mem.TrainableLayout(params=facts.total_params, param_bytes=full_r.weight_bytes, full=True,
                               autocast_copies=copies)
    cpu = dev_label == mem.CPU            # RSS: the process's libraries, and glibc's heap
    common = dict(arch=facts.arch, total_params=facts.total_params,
                  unquantized_params=facts.unquantized_params, compute_bytes=c,
                  cuda_context=mem.CPU_RUNTIME if cpu else mem.CUDA_CONTEXT,
                  fragmentation=mem.CPU_FRAGMENTATION if cpu else 0.10, **setup)
    qlayout = mem.QuantLayout(bits=qs.bits, shapes=facts.quant_shapes, double_quant=qs.double_quant)
    label = _label(spec)
    qlabel = "QLoRA" if (spec.method == "lora" and qs.bits == 4) else f"{label} + {qs.name}"
    adapted = {**common, "loss_chunk": adapter_chunk}   # prompt learning: the full loss (plan_args)
    scenarios = {FULL_FT: mem.memory_terms(trainable=full, **common),
                 label: mem.memory_terms(trainable=layout, **adapted),
                 qlabel: mem.memory_terms(trainable=layout, quant=qlayout, **adapted)}
    trainable = {FULL_FT: facts.total_params, label: count.params, qlabel: count.params}
    recipes = {FULL_FT: full_r, label: adapter_r, qlabel: adapter_r}
    return MemoryEstimate(
        model=facts.name, device=dev_label, device_bytes=dev_bytes,
        chosen=qlabel if q is not None else label, scenarios=scenarios, trainable=trainable,
        total_params=facts.total_params, adapter_file_bytes=count.params * 4, spec=spec, quant=q,
        batch_size=setup["batch"], seq_len=setup["seq"],
        gradient_checkpointing=bool(setup["checkpointing"]), optimizer=setup["optimizer"],
        precision=prec[0], grad_accum=setup["grad_accum"], recipes=recipes,
        loss_chunk=adapter_chunk)
