"""Plan before you train: will it fit?  :func:`estimate_memory` for full FT, LoRA and QLoRA.

The model is never loaded.  Its config is instantiated on PyTorch's ``meta`` device (shapes, no
storage; :func:`~lora_lab.hf.model.facts.model_facts`), so the parameter counts are exact and an 8B
or 70B config costs no more RAM than the imports.  The adapter's trainable parameters are counted on that meta model with the same
:func:`~lora_lab.hf.model.inspect.resolve_targets` and :func:`~lora_lab.inspect_model` that
:func:`lora_lab.attach` uses; the memory terms are :mod:`lora_lab.core.memory`'s formulas.

::

    est = lora_lab.estimate_memory("meta-llama/Llama-3.1-8B", quant="nf4", seq_len=1024, device="T4")
    est.verdict(), est.table()          # "fits" / "does not fit", and a GiB breakdown per scenario
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import torch

from ...core import memory as mem
from ...errors import SpecError
from ...specs import AdapterSpec, QuantSpec
from .facts import ModelFacts, model_facts
from .inspect import resolve_targets

__all__ = ["estimate_memory", "estimate_from_facts", "MemoryEstimate", "count_adapter", "TERMS"]

TERMS = ("base_weights", "quant_constants", "adapter_weights", "gradients", "optimizer_states",
         "activations", "logits", "allocator_overhead", "cuda_context")


# ----------------------------------------------------------------------------- the adapter
@dataclass(frozen=True)
class AdapterCount:
    """Trainable parameters of a spec on a model, and the adapted ``(in, out, r)`` modules."""

    params: int
    modules: tuple[tuple[int, int, int], ...]
    targets: tuple[str, ...]


def _ia3_targets(facts: ModelFacts, spec: AdapterSpec) -> tuple[list[str], list[str]]:
    if spec.target_modules != "all-linear":
        names = resolve_targets(facts.meta_model, spec)
        return names, [t for t in names if t in ("down_proj", "fc2", "c_proj", "w2")]
    from peft.utils.constants import (TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FF,
                                      TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TM)

    if facts.model_type not in TM:
        raise SpecError("AdapterSpec", "target_modules", "all-linear",
                        f"peft has no default IA3 targets for model type {facts.model_type!r}",
                        "pass target_modules=[...] explicitly")
    return list(TM[facts.model_type]), [f.split(".")[-1] for f in FF[facts.model_type]]


def _resolve(facts: ModelFacts, spec: AdapterSpec) -> list[str]:
    """:func:`resolve_targets` (the checks :func:`lora_lab.attach` makes on names and layers),
    memoized per (method, target_modules, layers); the rank is checked by the caller."""
    key = (spec.method, spec.target_modules, spec.layers)
    if key not in facts.resolved:
        if len(facts.resolved) > 256:                   # per-layer choices are many; stay small
            facts.resolved.clear()
        facts.resolved[key] = resolve_targets(facts.meta_model, spec.replace(r=1))
    return facts.resolved[key]


def count_adapter(facts: ModelFacts, spec: AdapterSpec) -> AdapterCount:
    """Exact trainable parameters of ``spec`` on the model (what peft will create).

    LoRA: ``r·(in + out)`` per adapted module, ``+ out`` for DoRA's magnitude; ``bias="all"``
    trains every bias, ``"lora_only"`` those of adapted modules.  IA3: one vector per module
    (``in`` for feed-forward modules, else ``out``).  Prompt tuning: ``n·hidden``.  Prefix tuning:
    ``n·layers·2·kv_dim`` (keys and values of every layer).
    """
    a, t = facts.arch, facts.table
    n = spec.num_virtual_tokens
    if spec.method == "prompt":
        return AdapterCount(n * a.hidden, (), ())
    if spec.method == "prefix":
        return AdapterCount(n * a.layers * 2 * a.kv_dim, (), ())
    if spec.method == "ia3":
        targets, ff = _ia3_targets(facts, spec)
        rows = t[t["module_type"].isin(targets)]
        if spec.layers is not None:
            rows = rows[rows["layer"].isin(spec.layers)]
        ff_rows = rows["module_type"].isin(ff)
        params = int(rows["in_features"][ff_rows].sum() + rows["out_features"][~ff_rows].sum())
        return AdapterCount(params, (), tuple(targets))
    targets = _resolve(facts, spec)
    rows = t[t["module_type"].isin(targets)]
    if spec.layers is not None:
        rows = rows[rows["layer"].isin(spec.layers)]
    fin, fout = rows["in_features"].to_numpy(), rows["out_features"].to_numpy()
    if len(fin) and spec.r > min(fin.min(), fout.min()):
        resolve_targets(facts.meta_model, spec)         # raises attach()'s error about r
    params = int(spec.r * (fin + fout).sum())
    if spec.use_dora:
        params += int(fout.sum())
    if spec.bias == "all":
        params += facts.bias_params
    elif spec.bias == "lora_only":
        params += int((rows["params"] - rows["in_features"] * rows["out_features"]).sum())
    modules = tuple((int(i), int(o), spec.r) for i, o in zip(fin, fout))
    return AdapterCount(params, modules, tuple(targets))


# ----------------------------------------------------------------------------- the estimate
def _label(spec: AdapterSpec) -> str:
    if spec.method != "lora":
        return {"prefix": "prefix", "prompt": "prompt", "ia3": "IA3"}[spec.method]
    return "DoRA" if spec.use_dora else ("rsLoRA" if spec.use_rslora else "LoRA")


@dataclass(frozen=True)
class MemoryEstimate:
    """The estimated GPU memory of one training setup, for full FT, the adapter and the adapter on
    a quantized base, side by side.  Bytes throughout; :meth:`table` gives GiB.

    ``scenarios`` maps a scenario name to its terms (see :mod:`lora_lab.core.memory`);
    ``chosen`` is the scenario that matches the arguments (the quantized one when ``quant`` was
    given).  ``need(s)`` is what the device must hold to train (reserved peak + CUDA context) and
    ``merge_need(s)`` what merging the adapter on the GPU afterwards needs.
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

    @property
    def breakdown(self) -> dict[str, float]:
        return dict(self.scenarios[self.chosen])

    def peak_allocated(self, scenario: str | None = None) -> float:
        """What ``torch.cuda.max_memory_allocated`` should report for a training step."""
        t = self.scenarios[scenario or self.chosen]
        return sum(t[k] for k in TERMS if k not in ("allocator_overhead", "cuda_context"))

    def peak_reserved(self, scenario: str | None = None) -> float:
        """What ``torch.cuda.max_memory_reserved`` should report for a training step."""
        return self.peak_allocated(scenario) + self.scenarios[scenario or self.chosen]["allocator_overhead"]

    def need(self, scenario: str | None = None) -> float:
        """Device memory training needs: the reserved peak plus the CUDA context."""
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
        """GiB per term (rows) and scenario (columns), with the totals and the verdicts."""
        rows = {s: {k: t[k] / mem.GIB for k in TERMS} for s, t in self.scenarios.items()}
        df = pd.DataFrame(rows).reindex(list(TERMS))
        df.loc["peak allocated"] = [self.peak_allocated(s) / mem.GIB for s in self.scenarios]
        df.loc["peak reserved"] = [self.peak_reserved(s) / mem.GIB for s in self.scenarios]
        df.loc["device need"] = [self.need(s) / mem.GIB for s in self.scenarios]
        df.loc["merge need"] = [self.merge_need(s) / mem.GIB for s in self.scenarios]
        return df

    def verdicts(self) -> dict[str, str]:
        return {s: self.verdict(s) for s in self.scenarios}

    def __repr__(self) -> str:
        parts = ", ".join(f"{s}={self.need(s) / mem.GIB:.1f} GiB ({self.verdict(s)})"
                          for s in self.scenarios)
        return (f"MemoryEstimate({self.model}, batch={self.batch_size}, seq_len={self.seq_len}, "
                f"checkpointing={self.gradient_checkpointing}, {self.device} "
                f"{self.device_bytes / mem.GIB:.0f} GiB: {parts}; chosen={self.chosen})")

    def _repr_html_(self) -> str:
        head = (f"<b>{self.model}</b> on {self.device} ({self.device_bytes / mem.GIB:.0f} GiB), "
                f"batch {self.batch_size} × {self.seq_len} tokens, checkpointing "
                f"{'on' if self.gradient_checkpointing else 'off'}, {self.optimizer}<br>")
        verdicts = " · ".join(f"{s}: <b>{v}</b>" for s, v in self.verdicts().items())
        return head + verdicts + self.table().round(2).to_html()


def _check_args(batch_size, seq_len, optimizer):
    for name, v in (("batch_size", batch_size), ("seq_len", seq_len)):
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            raise SpecError("estimate_memory", name, v, f"{name} must be an integer >= 1",
                            f"pass {name}=1" if name == "batch_size" else "pass seq_len=512")
    if optimizer not in mem.OPTIMIZERS:
        raise SpecError("estimate_memory", "optimizer", optimizer,
                        f"choose one of {mem.OPTIMIZERS}", "pass optimizer='adamw'")


def _device(device):
    try:
        return mem.device_bytes(device)
    except ValueError as exc:
        raise SpecError("estimate_memory", "device", device, str(exc),
                        f"pass one of {list(mem.DEVICES)} or a number of GB such as 24") from exc


def estimate_memory(model, adapter: AdapterSpec | None = None, quant=None, batch_size: int = 1,
                    seq_len: int = 512, gradient_checkpointing: bool = True,
                    optimizer: str = "adamw", device="T4", *,
                    padded: bool | None = None) -> MemoryEstimate:
    """Estimate the GPU memory of training ``adapter`` on ``model``, before loading anything.

    ``model``: a loaded model, a ``PretrainedConfig``, a local folder, a builtin name or a hub id
    (only its config.json is read).  ``adapter``: the :class:`~lora_lab.AdapterSpec`
    (default ``AdapterSpec()``: LoRA r=8 on all linear layers).  ``quant``: a
    :class:`~lora_lab.QuantSpec` or ``"nf4"``/``"fp4"``/``"int8"``; the quantized scenario uses
    it (NF4 with double quantization when None).  ``device``: ``"T4"``, ``"L4"``, ``"A10G"``,
    ``"A100-40GB"``, ``"A100-80GB"``, ``"H100"`` or a number of GiB.  For a model loaded by
    :func:`lora_lab.load_model` and :func:`lora_lab.attach`, ``adapter=None`` and ``quant=None``
    mean the attached (active) adapter and the quantization it was loaded with.

    Returns a :class:`MemoryEstimate` with full FT, the adapter on a 16-bit base and on the
    quantized base side by side; the formulas are in :mod:`lora_lab.core.memory`.
    """
    if isinstance(model, torch.nn.Module):       # a loaded model: its own adapter and quantization
        adapter = adapter if adapter is not None else _attached_spec(model)
        quant = quant if quant is not None else getattr(model, "lora_lab_quant", None)
    spec = adapter if adapter is not None else AdapterSpec()
    if not isinstance(spec, AdapterSpec):
        raise SpecError("estimate_memory", "adapter", adapter, "adapter must be an AdapterSpec or None",
                        "pass lora_lab.AdapterSpec(r=8)")
    return estimate_from_facts(model_facts(model), spec, quant, batch_size, seq_len,
                               gradient_checkpointing, optimizer, device, padded=padded)


def _attached_spec(model) -> AdapterSpec | None:
    specs = getattr(model, "lora_lab_specs", None) or {}
    active = getattr(model, "active_adapter", None)
    active = active if isinstance(active, str) else next(iter(specs), None)
    return specs.get(active)


def estimate_from_facts(facts: ModelFacts, spec: AdapterSpec, quant=None, batch_size: int = 1,
                        seq_len: int = 512, gradient_checkpointing: bool = True,
                        optimizer: str = "adamw", device="T4", *,
                        padded: bool | None = None) -> MemoryEstimate:
    """:func:`estimate_memory` on :class:`ModelFacts` already read (what a widget update calls)."""
    q = QuantSpec.parse(quant)
    _check_args(batch_size, seq_len, optimizer)
    dev_label, dev_bytes = _device(device)
    count = count_adapter(facts, spec)
    return _estimate(facts, spec, q, count, batch_size, seq_len, gradient_checkpointing, optimizer,
                     dev_label, dev_bytes, padded)


def _estimate(facts, spec, q, count, batch_size, seq_len, ckpt, optimizer, dev_label, dev_bytes,
              padded):
    qs = q or QuantSpec()
    c = 4 if qs.compute_dtype == "float32" else 2
    layout = mem.TrainableLayout(params=count.params, param_bytes=4, modules=count.modules,
                                 dropout=spec.dropout > 0, dora=spec.use_dora,
                                 extra_tokens=spec.num_virtual_tokens if spec.method == "prompt" else 0)
    full = mem.TrainableLayout(params=facts.total_params, param_bytes=c, full=True)
    common = dict(arch=facts.arch, total_params=facts.total_params,
                  unquantized_params=facts.unquantized_params, batch=batch_size, seq=seq_len,
                  checkpointing=ckpt, optimizer=optimizer, compute_bytes=c, padded=padded)
    qlayout = mem.QuantLayout(bits=qs.bits, shapes=facts.quant_shapes, double_quant=qs.double_quant)
    label = _label(spec)
    qlabel = "QLoRA" if (spec.method == "lora" and qs.bits == 4) else f"{label} + {qs.name}"
    scenarios = {"full FT": mem.memory_terms(trainable=full, **common),
                 label: mem.memory_terms(trainable=layout, **common),
                 qlabel: mem.memory_terms(trainable=layout, quant=qlayout, **common)}
    trainable = {"full FT": facts.total_params, label: count.params, qlabel: count.params}
    return MemoryEstimate(
        model=facts.name, device=dev_label, device_bytes=dev_bytes,
        chosen=qlabel if q is not None else label, scenarios=scenarios, trainable=trainable,
        total_params=facts.total_params, adapter_file_bytes=count.params * 4, spec=spec, quant=q,
        batch_size=batch_size, seq_len=seq_len, gradient_checkpointing=bool(ckpt),
        optimizer=optimizer)
