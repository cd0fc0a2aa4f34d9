"""Training recipes: in which dtypes the trained weights, their gradients and the optimizer live.

A trained parameter costs its weight, its gradient (torch makes ``p.grad`` in ``p``'s dtype) and
the optimizer's state (AdamW: two moments, ``exp_avg`` and ``exp_avg_sq``, made with
``zeros_like(p)``, so also in ``p``'s dtype).  Which dtype that is depends on the chip, so the bytes
per parameter do too.  With AdamW:

    recipe                         precision   where                    weight + grad + AdamW m,v
    fp32                           "fp32"      CPU                         4   +  4   +    8   = 16
    fp32 master + fp16 autocast    "fp16"      GPU without bf16 (T4)       4   +  4   +    8   = 16
    pure bf16                      "bf16"      A100, A10G, L4, H100        2   +  2   +    4   =  8
    adapters (LoRA, QLoRA, ...)    any         per adapter parameter       4   +  4   +    8   = 16

**Why a T4 needs fp32 master weights.**  fp16 has a 5-bit exponent: gradients below 2⁻²⁴ ≈ 6e-8
flush to zero, so fp16 training scales the loss (and so every gradient) by a factor S, and divides
the gradients by S before the optimizer step (Micikevicius et al. 2018, "Mixed precision
training", §3.2).  torch's ``GradScaler.unscale_`` refuses fp16 gradients (``ValueError:
Attempting to unscale FP16 gradients``): the update is meant for fp32 weights, since ``w + Δ`` in
fp16 (10-bit mantissa) rounds away any Δ below about 2⁻¹¹·|w|.  So the weights, and with them the
gradients and AdamW's moments, stay in fp32 (the *master* weights, §3.1) and ``torch.autocast``
runs the matmuls in fp16: the only full fine-tuning recipe that trains on a T4.  Autocast makes an
fp16 copy of each weight it feeds a matmul and keeps it until the autocast region ends (autograd
keeps it for the backward too), so the forward pass also holds 2 bytes per linear weight (LM head
included) of copies, and the residual stream stays fp32 (the embedding and the norms run outside
autocast).

**Why bf16 can be pure.**  bf16 has fp32's 8-bit exponent, so its gradients do not underflow and need
no loss scaling: weights, gradients and moments can all be bf16, 2 + 2 + 4 = 8 bytes/param.  That is
what peft's method comparison measured for full fine-tuning of Llama-3.2-3B (bf16 weights, no
autocast; huggingface/peft ``method_comparison/MetaMathQA``).  The price is precision: a bf16 weight
has 8 significant bits, so updates below about 2⁻⁹·|w| are rounded away; fp32 master weights
under bf16 autocast (``Trainer(bf16=True)`` on an fp32 model) avoid that at 16 bytes/param.

**Adapters** follow the same rule on every chip: peft upcasts fp16/bf16 adapter weights to fp32
(``get_peft_model(..., autocast_adapter_dtype=True)``, its default), so an adapter's weights,
gradients and moments are fp32 (a GradScaler can unscale them on a T4), while the frozen base stays
in the compute dtype (or 4/8 bits) and has no gradient and no optimizer state.

:func:`full_ft_recipe` and :func:`adapter_recipe` map a precision (``"fp32"``, ``"fp16"``,
``"bf16"``, as :func:`lora_lab.estimate_memory` resolves it from the device) to a :class:`Recipe`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .memory import optimizer_bytes_per_param

__all__ = ["ADAPTER_RECIPES", "FULL_FT_RECIPES", "Recipe", "adapter_recipe", "full_ft_recipe"]

_DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


@dataclass(frozen=True)
class Recipe:
    """Where the trained parameters live: ``weight_bytes`` per trained weight as stored (the
    gradient and AdamW's moments take the same dtype), ``compute`` the dtype of the matmuls and
    activations, ``scaler`` whether the loss is scaled (fp16), ``why`` one sentence of reason."""

    name: str
    weight_bytes: int
    compute: str
    scaler: bool
    why: str
    adapters: bool = False          # trains adapters on a frozen base (not every weight)

    @property
    def grad_bytes(self) -> int:
        return self.weight_bytes

    @property
    def compute_bytes(self) -> int:
        return _DTYPE_BYTES[self.compute]

    @property
    def master_weights(self) -> bool:
        """fp32 weights under a 16-bit autocast: autocast makes 16-bit copies in the forward."""
        return self.weight_bytes > self.compute_bytes

    def state_bytes(self, optimizer: str = "adamw") -> float:
        """Optimizer state per trained parameter (AdamW: 2 × ``weight_bytes``)."""
        return optimizer_bytes_per_param(optimizer, self.weight_bytes)

    def bytes_per_param(self, optimizer: str = "adamw") -> float:
        """Weight + gradient + optimizer state per trained parameter: 16 or 8 with AdamW."""
        return self.weight_bytes + self.grad_bytes + self.state_bytes(optimizer)

    def sum_text(self, optimizer: str = "adamw") -> str:
        """``"4 + 4 + 8 = 16 B/param"``: weight + gradient + optimizer state per trained param."""
        unit = "B per adapter param" if self.adapters else "B/param"
        return (f"{self.weight_bytes} + {self.grad_bytes} + {self.state_bytes(optimizer):.3g} = "
                f"{self.bytes_per_param(optimizer):.3g} {unit}")

    def describe(self, optimizer: str = "adamw") -> str:
        """One line: the recipe, its bytes per trained parameter, and why."""
        return f"{self.name}, {self.sum_text(optimizer)} ({self.why})"

    def __repr__(self) -> str:
        return f"Recipe({self.name}: {self.sum_text()})"


FULL_FT_RECIPES: dict[str, Recipe] = {
    "fp32": Recipe("fp32 weights, gradients and AdamW", 4, "fp32", False,
                   "no 16-bit autocast"),
    "fp16": Recipe("fp32 master weights + fp16 autocast + loss scaling", 4, "fp16", True,
                   "fp16 gradients need loss scaling and GradScaler refuses fp16 gradients, so "
                   "weights, gradients and AdamW stay fp32; the only recipe that trains on a T4; "
                   "+ 2 B per linear weight of fp16 copies during the forward"),
    "bf16": Recipe("pure bf16 (weights, gradients and AdamW in bf16)", 2, "bf16", False,
                   "bf16 has fp32's exponent range: no loss scaling, no fp32 master copy"),
}
ADAPTER_RECIPES: dict[str, Recipe] = {
    p: Recipe("fp32 adapters" + ("" if p == "fp32" else f", {p} autocast"), 4, p, p == "fp16",
              "peft's autocast_adapter_dtype=True upcasts adapter weights to fp32; the frozen base "
              f"({p} or 4/8-bit) has no gradient and no optimizer state",
              adapters=True)
    for p in ("fp32", "fp16", "bf16")
}


def _lookup(table: dict[str, Recipe], precision: str) -> Recipe:
    try:
        return table[precision]
    except KeyError:
        raise ValueError(f"unknown precision {precision!r}: choose one of {list(table)}") from None


def full_ft_recipe(precision: str) -> Recipe:
    """The full fine-tuning recipe for a resolved precision (see the module docstring)."""
    return _lookup(FULL_FT_RECIPES, precision)


def adapter_recipe(precision: str) -> Recipe:
    """The adapter recipe (LoRA, DoRA, QLoRA, IA3, prompts) for a resolved precision."""
    return _lookup(ADAPTER_RECIPES, precision)
