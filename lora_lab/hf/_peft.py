"""The one place that knows peft's internal names.

peft wraps a model as ``PeftModel(base_model=LoraModel(model=<the transformers model>))``, so every
module name of a wrapped model starts with ``base_model.model.``.  Each adapted layer keeps one entry
per adapter in ``nn.ModuleDict``s: ``lora_A[name]`` (weight r × in) and ``lora_B[name]`` (weight
out × r), and ``active_adapter`` is a name or a list of names depending on where it is read.  The
rest of lora_lab asks these questions here, so a change of peft's layout is a change of one file.
"""

from __future__ import annotations

from typing import Iterator

from torch import nn

from ..errors import AdapterError

__all__ = ["PREFIX", "is_peft", "base_of", "require_peft", "require_adapter", "strip_prefix", "active_name",
           "lora_layers", "check_adapter_name", "InputCastOff", "tuner_layers"]

PREFIX = "base_model.model."
"""What peft puts before every module name of the wrapped model."""


def is_peft(model) -> bool:
    """True when ``model`` is wrapped by peft (has adapters, or had them)."""
    import peft

    return isinstance(model, peft.PeftModel)


def base_of(model) -> nn.Module:
    """The transformers model under peft's wrapper (``model.get_base_model()``), or ``model`` itself
    when nothing wraps it.  Asked by attribute, so a ``torch.compile`` wrapper of a peft model (which
    forwards attributes to it) answers too."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def require_peft(model, error=AdapterError):
    """``model`` itself when it has adapters, else ``error`` with the fix."""
    if not is_peft(model):
        raise error("This model has no adapters yet.",
                    "attach one with lora_lab.attach(model, spec) or lora_lab.load_adapter")
    return model


def require_adapter(model, name: str) -> None:
    """An :class:`AdapterError` listing the loaded adapters when ``model`` has none named ``name``."""
    if name not in model.peft_config:
        raise AdapterError(f"There is no adapter named {name!r}.",
                           f"pass one of {sorted(model.peft_config)}")


def strip_prefix(name: str) -> str:
    """``base_model.model.model.layers.0.q_proj`` → ``model.layers.0.q_proj`` (the base's name)."""
    return name.removeprefix(PREFIX)


def active_name(model, adapter: str | None = None) -> str | None:
    """``adapter`` when given, else the model's active adapter as one name (None without adapters).

    peft reports ``active_adapter`` as a string on the ``PeftModel`` and as a list on the tuner and
    its layers; this reads either."""
    if adapter is not None:
        return adapter
    active = getattr(model, "active_adapter", None)
    if isinstance(active, (list, tuple)):
        return active[0] if active else None
    return active


def lora_layers(model: nn.Module, adapter: str | None = None) -> Iterator[tuple[str, nn.Module]]:
    """``(base module name, layer)`` for every LoRA layer (those holding ``lora_A``), in model order;
    with ``adapter``, only the layers that hold that adapter."""
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, nn.ModuleDict) and (adapter is None or adapter in lora_a):
            yield strip_prefix(name), module


_RESERVED = frozenset(n for n in dir(nn.ModuleDict) + dir(nn.ParameterDict) if not n.startswith("_"))


def check_adapter_name(name, error=AdapterError) -> None:
    """peft keeps each adapter as a key of ``nn.ModuleDict``s in every adapted layer
    (``lora_A[name]``), so a name must be a non-empty string without dots that is not already an
    attribute of a ``ModuleDict`` (``half``, ``train``, ``to``, ``keys``, ...); otherwise peft fails
    deep inside with a ``KeyError``."""
    if not isinstance(name, str) or not name or "." in name or name in _RESERVED:
        why = "is a method or attribute of torch modules" if name in _RESERVED else "is not usable"
        raise error(f"Adapter name {name!r} {why}.",
                    "pass a short name without dots, such as 'math' or 'default'")


class InputCastOff:
    """Context: peft's adapter layers take their input as it comes instead of casting it to the
    adapter's dtype, then restore each layer's setting (also on error).

    peft casts a layer's input ``x`` to the dtype of ``lora_A`` (fp32: peft keeps adapters in fp32)
    before ``B·A·x`` (``BaseTunerLayer._cast_input_dtype``, switched by the layer's
    ``cast_input_dtype_enabled``).  Under a 16-bit autocast the linear layers cast it straight
    back, so the 16-bit → fp32 → 16-bit round trip changes no bit (every 16-bit value is exact in
    fp32) and costs two copies per layer and their backward.  Measured on SmolLM2-135M (bf16 base,
    LoRA r=8 on 210 layers, batch 4×64, 2-core CPU, idle, interleaved medians): identical loss and
    gradients, 0.926 s a step against 0.955 s (3%; a first run on a loaded machine read 0.93
    against 2.40, which was the load).  With LoRA dropout the mask is applied in 16 bits instead
    of fp32: equal within bf16's rounding (gradients 0.5% apart at most on builtin:tiny), not bit
    for bit.  Only for a forward *and* its backward under autocast: without autocast the fp32
    adapter weights need the cast, and a checkpointed layer recomputed in the backward must see
    the same setting as its forward.  ``layers``: ``tuner_layers(model)``, listed once."""

    def __init__(self, layers: list[nn.Module]):
        self.layers, self.saved = layers, []

    def __enter__(self):
        self.saved = [m.cast_input_dtype_enabled for m in self.layers]
        for m in self.layers:
            m.cast_input_dtype_enabled = False
        return self

    def __exit__(self, *exc) -> None:
        for m, on in zip(self.layers, self.saved):
            m.cast_input_dtype_enabled = on


def tuner_layers(model: nn.Module) -> list[nn.Module]:
    """The LoRA layers of ``model`` whose input cast :class:`InputCastOff` may skip: peft's
    ``LoraLayer``s without DoRA (DoRA computes its weight norm from the fp32 input: without the
    cast a bf16 run's gradients moved by up to 13% on builtin:tiny)."""
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules()
            if isinstance(m, LoraLayer) and hasattr(m, "cast_input_dtype_enabled")
            and not any(getattr(m, "use_dora", {}).values())]
