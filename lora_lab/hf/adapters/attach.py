"""Attach an adapter described by an :class:`~lora_lab.AdapterSpec` to a model.

Validation against the model happens here, before peft sees anything, so a mistake gets a
:class:`~lora_lab.errors.TargetModuleError` that lists what the model has, not a trace from peft.
"""

from __future__ import annotations

import warnings

from torch import nn

from ...errors import AdapterError, SpecError
from ...specs import AdapterSpec
from .._peft import check_adapter_name, is_peft
from ..model.inspect import is_quantized, resolve_targets
from ..model.lm_head import keep_head_input_contiguous
from .peft_config import to_peft_config

__all__ = ["attach"]


def _prepare_kbit(model: nn.Module, gradient_checkpointing: bool) -> nn.Module:
    """peft's k-bit preparation (fp32 norms, input grads), with checkpointing as a visible choice:
    peft's ``prepare_model_for_kbit_training`` turns it on silently by default, costing about a third
    of the speed."""
    from peft import prepare_model_for_kbit_training

    if getattr(model, "_lora_lab_kbit_prepared", False):
        return model
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    model._lora_lab_kbit_prepared = True
    return model


def attach(model: nn.Module, spec: AdapterSpec | None = None, name: str = "default", *,
           gradient_checkpointing: bool = False) -> nn.Module:
    """Attach adapter ``spec`` under ``name`` and make it the active, trainable adapter.

    Returns the peft model (``PeftModel``).  Called on a model that already has adapters it adds
    another one.  On a quantized base (QLoRA) the model is prepared for k-bit training first;
    ``gradient_checkpointing`` trades about a third of the speed for activation memory and is off
    unless you ask for it.  The new adapter's random initial weights (LoRA's A, prefix and prompt
    embeddings) come from torch's global generator, which torch 2.13 seeds differently in each
    process: ``torch.manual_seed(s)`` first gives the same adapter on every run (``TrainSpec.seed``
    seeds only what the run itself draws).
    """
    import peft

    spec = spec or AdapterSpec()
    if not isinstance(spec, AdapterSpec):
        raise SpecError("attach", "spec", spec, "spec must be an AdapterSpec",
                        "pass lora_lab.AdapterSpec(r=8)")
    check_adapter_name(name)
    wrapped = is_peft(model)
    if wrapped and name in model.peft_config:
        raise AdapterError(f"The model already has an adapter named {name!r}.",
                           f"pass another name, or delete it first with "
                           f"lora_lab.delete_adapter(model, {name!r})")
    targets = None
    if spec.method in ("lora", "ia3"):
        explicit = resolve_targets(model, spec)
        targets = explicit if spec.method == "lora" or spec.target_modules != "all-linear" else None
    base = model.get_base_model() if wrapped else model
    if spec.init == "loftq" and not getattr(base, "is_loaded_in_4bit", False):
        raise SpecError("AdapterSpec", "init", "loftq",
                        "LoftQ initialises an adapter against a 4-bit base, and this base is not "
                        "4-bit", "load it with lora_lab.load_model(source, quant='nf4'), or use "
                        "init='default' or 'pissa' on a full-precision base")
    if spec.init in ("pissa", "olora") and is_quantized(model):
        raise SpecError("AdapterSpec", "init", spec.init,
                        f"{spec.init} rewrites the base weights, which a quantized base cannot take",
                        "load the base in full precision (quant=None) or use init='default'")
    config = to_peft_config(spec, target_modules=targets)
    if spec.method == "lora" and spec.layers is not None:
        config.layers_to_transform = list(spec.layers)
    if is_quantized(model):
        from ..model.kbit import unpack_4bit_weights

        unpack_4bit_weights(model)  # a model evaluated before lora_lab saw it (hf/model/kbit.py)
    if is_quantized(model) and not wrapped:
        model = _prepare_kbit(model, gradient_checkpointing)
    elif gradient_checkpointing and not wrapped:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    try:
        with warnings.catch_warnings():  # peft 0.21 reads transformers' deprecated property
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            if wrapped:
                model.add_adapter(name, config)
                model.set_adapter(name)
            else:
                model = peft.get_peft_model(model, config, adapter_name=name)
    except (ValueError, TypeError, KeyError) as exc:
        raise AdapterError(f"peft could not attach adapter {name!r} ({spec.method}): "
                           f"{str(exc).splitlines()[0]}",
                           "adapters of different methods (LoRA vs prefix/prompt) cannot share one "
                           "model; load a fresh base for another method") from exc
    if spec.init == "loftq":
        from .loftq import loftq_initialize

        model.lora_lab_loftq = {**getattr(model, "lora_lab_loftq", {}),
                                name: loftq_initialize(model, name)}
    specs = dict(getattr(model, "lora_lab_specs", {}))
    specs[name] = spec
    model.lora_lab_specs = specs
    return keep_head_input_contiguous(model)  # the base is frozen now (hf/model/lm_head.py)

