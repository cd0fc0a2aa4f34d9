"""Trainable parameters of an :class:`~lora_lab.AdapterSpec` on a model, counted before it exists.

:func:`count_adapter` counts on the meta-device model of :class:`~lora_lab.hf.model.facts.ModelFacts`
(shapes, no storage) what peft will create, through the same
:func:`~lora_lab.hf.model.inspect.resolve_targets` checks that :func:`lora_lab.attach` makes; the
memory planner (:mod:`lora_lab.hf.model.plan`, which re-exports it) turns the count into bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import SpecError
from ...specs import AdapterSpec
from .facts import ModelFacts
from .inspect import resolve_targets

__all__ = ["AdapterCount", "count_adapter"]


@dataclass(frozen=True)
class AdapterCount:
    """Trainable parameters of a spec on a model, and the adapted ``(in, out, r)`` modules."""

    params: int
    modules: tuple[tuple[int, int, int], ...]
    targets: tuple[str, ...]
    ia3_modules: tuple[tuple[int, int, bool], ...] = ()   # (in, out, feed-forward) for IA3


def _ia3_targets(facts: ModelFacts, spec: AdapterSpec) -> tuple[list[str], list[str]]:
    if spec.target_modules != "all-linear":
        names = resolve_targets(facts.meta_model, spec)
        return names, [t for t in names if t in ("down_proj", "fc2", "c_proj", "w2")]
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FF,
    )
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TM,
    )

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
        ia3 = tuple((int(i), int(o), bool(f)) for i, o, f in
                    zip(rows["in_features"], rows["out_features"], ff_rows))
        return AdapterCount(params, (), tuple(targets), ia3)
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
