"""AdapterSpec -> peft config.  The one place that knows peft's config classes and field names."""

from __future__ import annotations

from ...specs import AdapterSpec

__all__ = ["to_peft_config", "spec_from_peft_config"]

# "loftq": peft's LoftQ init calls .cuda() and ignores α/r; attach() creates the adapter
# with peft's default init and then runs lora_lab.hf.adapters.loftq on it.
_PEFT_INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora",
              "loftq": True}


def to_peft_config(spec: AdapterSpec, task_type: str = "CAUSAL_LM",
                   target_modules: list[str] | None = None):
    """The peft config for ``spec``.

    ``target_modules`` overrides ``spec.target_modules`` with names already resolved against a model
    (``attach`` does this so that ``"all-linear"`` and ``layers`` become explicit).
    """
    import peft

    targets = target_modules if target_modules is not None else spec.target_modules
    if isinstance(targets, tuple):
        targets = list(targets)
    if spec.method == "lora":
        return peft.LoraConfig(
            task_type=task_type, r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
            target_modules=targets, bias=spec.bias, use_dora=spec.use_dora,
            use_rslora=spec.use_rslora, init_lora_weights=_PEFT_INIT[spec.init],
            layers_to_transform=list(spec.layers) if spec.layers and target_modules is None else None,
        )
    if spec.method == "prefix":
        return peft.PrefixTuningConfig(task_type=task_type,
                                       num_virtual_tokens=spec.num_virtual_tokens)
    if spec.method == "prompt":
        return peft.PromptTuningConfig(task_type=task_type,
                                       num_virtual_tokens=spec.num_virtual_tokens)
    # IA3 (Liu et al. 2022, §3.3): learned vectors that rescale keys, values and the FFN input.
    if targets == "all-linear" or targets is None:
        return peft.IA3Config(task_type=task_type)  # peft's per-architecture default (k, v, down)
    ff = [t for t in targets if t.split(".")[-1] in ("down_proj", "fc2", "c_proj", "w2")]
    return peft.IA3Config(task_type=task_type, target_modules=targets, feedforward_modules=ff)


def spec_from_peft_config(cfg) -> AdapterSpec:
    """Best-effort inverse of :func:`to_peft_config`, for adapters loaded from disk."""
    kind = str(getattr(cfg, "peft_type", "")).split(".")[-1].upper()
    if kind == "LORA":
        init = {True: "default", False: "default"}.get(cfg.init_lora_weights, cfg.init_lora_weights)
        init = init if init in _PEFT_INIT else "default"
        targets = cfg.target_modules
        targets = tuple(sorted(targets)) if isinstance(targets, (set, list, tuple)) else targets
        layers = cfg.layers_to_transform
        layers = (layers,) if isinstance(layers, int) else (tuple(layers) if layers else None)
        return AdapterSpec(method="lora", r=cfg.r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                           target_modules=targets, layers=layers, init=init, bias=cfg.bias,
                           use_dora=bool(cfg.use_dora), use_rslora=bool(cfg.use_rslora))
    if kind in ("PREFIX_TUNING", "PROMPT_TUNING"):
        method = "prefix" if kind == "PREFIX_TUNING" else "prompt"
        return AdapterSpec(method=method, num_virtual_tokens=cfg.num_virtual_tokens)
    if kind == "IA3":
        tm = cfg.target_modules
        tm = tuple(sorted(tm)) if isinstance(tm, (set, list, tuple)) else "all-linear"
        return AdapterSpec(method="ia3", target_modules=tm)
    raise ValueError(f"unsupported peft type {kind}")
