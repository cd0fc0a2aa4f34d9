"""Weighted combinations of LoRA adapters, checked before they are trusted.

peft's ``add_weighted_adapter`` builds a new adapter from several.  With ``"cat"`` the result is exact:
ΔW = Σᵢ wᵢ·ΔWᵢ at rank Σᵢ rᵢ.  ``"svd"`` is the best rank-k approximation of that sum; ``"linear"``
mixes the factors (A = Σ√(wᵢsᵢ)Aᵢ, B = Σ√(wᵢsᵢ)Bᵢ), which is *not* Σ wᵢ·ΔWᵢ when more than one
adapter is mixed; ``"ties"``, ``"dare_*"`` and ``"magnitude_prune"`` prune before they sum
(Yadav et al. 2023; Yu et al. 2023).

peft builds the new adapter's config from the first adapter's, with ``lora_alpha = r``.  For rsLoRA
that gives a scaling of √r instead of 1, and DoRA magnitudes are not combined at all, so those blends
are wrong without any error.  ``blend_adapters`` refuses them and, whatever the inputs, runs a
self-check first: the blend of one adapter alone at weight 1.0 must reproduce that adapter's ΔW.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import BlendError
from .._peft import check_adapter_name, is_peft
from .factors import lora_factors

__all__ = ["blend_adapters", "BlendReport", "COMBINATIONS"]

COMBINATIONS = ("cat", "linear", "svd", "ties", "ties_svd", "dare_linear", "dare_ties",
                "dare_linear_svd", "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
_SELF_CHECK = "__lora_lab_selfcheck"
TOLERANCE = 1e-4


@dataclass(frozen=True)
class BlendReport:
    """What :func:`blend_adapters` built and how well it passed its checks (relative errors)."""

    name: str
    combination: str
    weights: dict
    r: int
    self_check_error: float
    sum_error: float | None  # ‖ΔW_blend − Σ wᵢΔWᵢ‖ / ‖Σ wᵢΔWᵢ‖ where the combination is exact

    def __repr__(self) -> str:
        se = "n/a" if self.sum_error is None else f"{self.sum_error:.1e}"
        return (f"BlendReport({self.name!r}, {self.combination}, r={self.r}, weights={self.weights}, "
                f"self_check={self.self_check_error:.1e}, sum_error={se})")


def _probe_apply(model, adapter: str, probes: dict) -> dict[str, torch.Tensor]:
    """ΔW·X for each module, with X a fixed random (in × 8) probe: cheap, and equal iff ΔW equal."""
    out = {}
    for f in lora_factors(model, adapter):
        if f.name not in probes:
            g = torch.Generator().manual_seed(hash(f.name) % 2**31)
            probes[f.name] = torch.randn(f.A.shape[1], 8, generator=g)
        X = probes[f.name].to(f.A.device, torch.float32)
        out[f.name] = f.scaling * (f.B.float() @ (f.A.float() @ X))
    return out


def _rel_error(got: dict, want: dict) -> float:
    num = sum(float((got[k] - want[k]).norm() ** 2) for k in want)
    den = sum(float(want[k].norm() ** 2) for k in want)
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


def _refuse_known_bugs(model, names, combination) -> None:
    for n in names:
        cfg = model.peft_config[n]
        if getattr(cfg, "use_rslora", False):
            raise BlendError(f"Adapter {n!r} uses rsLoRA: peft's blend gives it scaling √r instead "
                             "of 1, so the blended ΔW would be wrong.",
                             "train the adapters without rsLoRA to blend them, or switch between "
                             "them instead")
        if getattr(cfg, "use_dora", False):
            raise BlendError(f"Adapter {n!r} uses DoRA: peft's blend drops the learned magnitudes.",
                             "blend plain LoRA adapters only; switch between DoRA adapters")
        if getattr(cfg, "rank_pattern", None) or getattr(cfg, "alpha_pattern", None):
            raise BlendError(f"Adapter {n!r} has a per-module rank_pattern/alpha_pattern, which "
                             "peft's blend ignores.", "blend adapters with one rank everywhere")
    ranks = {model.peft_config[n].r for n in names}
    if combination == "linear" and len(ranks) > 1:
        raise BlendError(f"'linear' needs adapters of one rank; these have ranks {sorted(ranks)}.",
                         "use combination='cat' (exact) or 'svd'")


def _add(model, names, weights, new, combination, **kw) -> None:
    try:
        model.add_weighted_adapter(names, weights, new, combination_type=combination, **kw)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise BlendError(f"peft could not blend {names} with '{combination}': "
                         f"{str(exc).splitlines()[0]}",
                         "check that the adapters target the same modules") from exc


def blend_adapters(model: nn.Module, weights: dict[str, float], name: str = "blend",
                   combination: str = "cat", *, svd_rank: int | None = None,
                   density: float | None = None, refuse_known_bugs: bool = True,
                   activate: bool = True) -> BlendReport:
    """Create adapter ``name`` = weighted combination of ``weights`` (adapter name -> weight).

    ``combination="cat"`` (default) is exact.  Raises :class:`~lora_lab.errors.BlendError` for the
    combinations peft gets wrong, and when the self-check or the sum check fails.
    """
    if not is_peft(model):
        raise BlendError("This model has no adapters to blend.", "attach or load adapters first")
    if combination not in COMBINATIONS:
        raise BlendError(f"combination={combination!r} is not known.", f"use one of {COMBINATIONS}")
    names, ws = list(weights), [float(w) for w in weights.values()]
    missing = [n for n in names if n not in model.peft_config]
    if not names or missing:
        raise BlendError(f"Cannot blend {names}: unknown adapters {missing}.",
                         f"pass names from {sorted(model.peft_config)}")
    if not all(math.isfinite(w) for w in ws):
        raise BlendError(f"Blend weights must be finite numbers; got {ws}.", "pass weights like 0.5")
    if name in model.peft_config:
        raise BlendError(f"An adapter named {name!r} exists already.", "pass another name=")
    check_adapter_name(name, BlendError)
    if refuse_known_bugs:
        _refuse_known_bugs(model, names, combination)
    kw = {"svd_rank": svd_rank} if combination.endswith("svd") else {}
    if density is not None:
        kw["density"] = density
    active = model.active_adapter
    probes: dict = {}
    # Self-check: one adapter alone at weight 1.0 must come back unchanged.
    _add(model, names[:1], [1.0], _SELF_CHECK, combination,
         **({**kw, "density": 1.0} if "density" in kw else kw))
    try:
        self_err = _rel_error(_probe_apply(model, _SELF_CHECK, probes),
                              _probe_apply(model, names[0], probes))
    finally:
        model.delete_adapter(_SELF_CHECK)
        model.set_adapter(active)
    if not self_err <= TOLERANCE:
        raise BlendError(f"Self-check failed: blending {names[0]!r} alone at weight 1.0 with "
                         f"'{combination}' changes its ΔW by {self_err:.1%}. The blend would be wrong.",
                         "use combination='cat', and plain LoRA adapters (no rsLoRA/DoRA)")
    _add(model, names, ws, name, combination, **kw)
    sum_err = None
    exact = combination == "cat" or (combination == "svd" and svd_rank is not None and
                                     svd_rank >= sum(model.peft_config[n].r for n in names))
    if exact:
        want: dict = {}
        for n, w in zip(names, ws):
            for k, v in _probe_apply(model, n, probes).items():
                want[k] = want.get(k, 0) + w * v
        sum_err = _rel_error(_probe_apply(model, name, probes), want)
        if not sum_err <= 1e-3:
            model.delete_adapter(name)
            model.set_adapter(active)
            raise BlendError(f"The '{combination}' blend differs from Σ wᵢ·ΔWᵢ by {sum_err:.1%}.",
                             "report this; use switching instead of blending meanwhile")
    model.set_adapter(name if activate else active)
    specs = dict(getattr(model, "lora_lab_specs", {}))
    if names[0] in specs:
        specs[name] = specs[names[0]].replace(r=model.peft_config[name].r,
                                              alpha=float(model.peft_config[name].lora_alpha))
    model.lora_lab_specs = specs
    return BlendReport(name=name, combination=combination, weights=dict(zip(names, ws)),
                       r=model.peft_config[name].r, self_check_error=self_err, sum_error=sum_err)
