"""Specs: frozen, validated descriptions of a choice.

A spec is a value.  It is checked when it is made, so a bad value fails at the line that wrote it,
with a :class:`~lora_lab.errors.SpecError` that names the field, the value, the allowed range and the
fix.  Widgets edit specs; ``spec`` is what a user takes away from a widget.

* :class:`AdapterSpec` — which adapter to attach (LoRA and friends, prefix, prompt, IA3).
* :class:`QuantSpec` — how to quantize the base model (bitsandbytes int8, NF4, FP4).
* :class:`DataSpec` — how to turn prompt/response rows into tokenized training examples.
* :class:`TrainSpec` — how to train (steps, batch, learning rate, ...).

Checks that need the model (do these target modules exist? is r <= min(in, out)?) happen later, in
:func:`lora_lab.attach`, because a spec is made before any model is loaded.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, Sequence

from .errors import SpecError

__all__ = ["AdapterSpec", "QuantSpec", "DataSpec", "TrainSpec", "PRESET_TARGETS"]

# Module-name presets, in Llama naming (also Qwen, Mistral, SmolLM, Gemma).
PRESET_TARGETS: dict[str, tuple[str, ...]] = {
    "attention-qv": ("q_proj", "v_proj"),  # LoRA paper (Hu et al. 2021, §4.2, §7.1)
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    # "all-linear" is resolved against the model: every nn.Linear except the LM head (QLoRA §4).
}

METHODS = ("lora", "prefix", "prompt", "ia3")
INITS = ("default", "gaussian", "pissa", "olora", "loftq")
BIASES = ("none", "all", "lora_only")


def _check(ok: bool, spec: str, name: str, value, allowed: str, fix: str | None = None) -> None:
    if not ok:
        raise SpecError(spec, name, value, allowed, fix)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class AdapterSpec:
    """What adapter to attach to a model.

    LoRA (Hu et al. 2021) freezes W (out × in) and learns ΔW = s · B · A with
    A: (r × in), B: (out × r), B initialised to zero so that training starts at the base model.
    The scaling is s = alpha / r, or s = alpha / √r with rsLoRA (Kalajdzievski 2023), which keeps
    the update's size stable as r grows.  DoRA (Liu et al. 2024) also learns a per-column magnitude.

    Parameters
    ----------
    method: ``"lora"`` (also DoRA and rsLoRA through the flags), ``"prefix"`` (Li & Liang 2021),
        ``"prompt"`` (Lester et al. 2021) or ``"ia3"`` (Liu et al. 2022).
    r: LoRA rank; each adapted ``in → out`` linear adds ``r · (in + out)`` parameters.
    alpha: LoRA alpha; ``None`` means ``2 · r`` (scaling 2, a common safe choice).
    dropout: dropout on the LoRA input path, in [0, 1).
    target_modules: ``"all-linear"`` (QLoRA paper: every linear but the LM head), a preset name
        from :data:`PRESET_TARGETS`, or a sequence of module names such as ``("q_proj", "v_proj")``.
    layers: decoder-layer indices to adapt, or ``None`` for all of them.
    init: ``"default"`` (peft: Kaiming-uniform A, zero B), ``"gaussian"``, ``"pissa"``
        (Meng et al. 2024), ``"olora"`` or ``"loftq"`` (Li et al. 2023).
    bias: ``"none"``, ``"all"`` or ``"lora_only"``.
    num_virtual_tokens: soft tokens for prefix and prompt tuning.
    """

    method: Literal["lora", "prefix", "prompt", "ia3"] = "lora"
    r: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] = "all-linear"
    layers: tuple[int, ...] | None = None
    init: Literal["default", "gaussian", "pissa", "olora", "loftq"] = "default"
    bias: Literal["none", "all", "lora_only"] = "none"
    use_dora: bool = False
    use_rslora: bool = False
    num_virtual_tokens: int = 20

    def __post_init__(self):
        S = "AdapterSpec"
        _check(isinstance(self.method, str) and self.method in METHODS, S, "method", self.method,
               f"choose one of {METHODS}", "pass method='lora' (DoRA and rsLoRA are LoRA with "
               "use_dora=True or use_rslora=True)")
        _check(_is_int(self.r) and self.r >= 1, S, "r", self.r,
               "r must be an integer >= 1", "pass r=8 (a good default) or another positive integer")
        if self.alpha is None:
            object.__setattr__(self, "alpha", float(2 * self.r))
        _check(isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool)
               and math.isfinite(self.alpha) and self.alpha > 0, S, "alpha", self.alpha,
               "alpha must be a positive number", "pass alpha=2*r, or leave it out for that default")
        object.__setattr__(self, "alpha", float(self.alpha))
        _check(isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0, S, "dropout",
               self.dropout, "dropout must be in [0, 1)", "pass dropout=0.0 or 0.05")
        tm = self.target_modules
        if isinstance(tm, str):
            if tm in PRESET_TARGETS:
                tm = PRESET_TARGETS[tm]
            elif tm != "all-linear":
                tm = (tm,)
        else:
            _check(isinstance(tm, Sequence) and len(tm) > 0
                   and all(isinstance(t, str) and t for t in tm), S, "target_modules", tm,
                   "target_modules must be 'all-linear', a preset name or a non-empty list of names",
                   "pass 'all-linear' or names such as ('q_proj', 'v_proj'); presets: "
                   f"{list(PRESET_TARGETS)}")
            tm = tuple(dict.fromkeys(tm))
        object.__setattr__(self, "target_modules", tm)
        if self.layers is not None:
            layers = tuple(self.layers) if not _is_int(self.layers) else (self.layers,)
            _check(len(layers) > 0 and all(_is_int(i) and i >= 0 for i in layers), S, "layers",
                   self.layers, "layers must be None or a non-empty list of layer indices >= 0",
                   "pass layers=None to adapt every layer")
            object.__setattr__(self, "layers", tuple(sorted(set(layers))))
        _check(isinstance(self.init, str) and self.init in INITS, S, "init", self.init,
               f"choose one of {INITS}", "pass init='default' (peft's Kaiming-uniform A, zero B)")
        _check(isinstance(self.bias, str) and self.bias in BIASES, S, "bias", self.bias,
               f"choose one of {BIASES}", "pass bias='none' (biases stay frozen)")
        _check(_is_int(self.num_virtual_tokens) and self.num_virtual_tokens >= 1, S,
               "num_virtual_tokens", self.num_virtual_tokens, "num_virtual_tokens must be an integer >= 1",
               "pass num_virtual_tokens=20")
        if self.method != "lora":
            for flag in ("use_dora", "use_rslora"):
                _check(not getattr(self, flag), S, flag, True,
                       f"{flag} only applies to method='lora'", f"pass method='lora' or {flag}=False")
            _check(self.init == "default", S, "init", self.init,
                   "init only applies to method='lora'", "leave init='default'")
        _check(not (self.use_dora and self.init in ("pissa", "olora", "loftq")), S, "init",
               self.init, "DoRA is supported with the 'default' and 'gaussian' inits only",
               "pass init='default' with use_dora=True")

    @property
    def scaling(self) -> float:
        """The LoRA scaling s in ΔW = s·B·A: alpha/r, or alpha/√r with rsLoRA."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @property
    def is_lora(self) -> bool:
        return self.method == "lora"

    def replace(self, **changes: Any) -> "AdapterSpec":
        """A copy with some fields changed (and validated again)."""
        if "r" in changes and "alpha" not in changes:
            changes["alpha"] = self.alpha
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)


QUANT_SHORTHANDS = {"nf4": (4, "nf4"), "fp4": (4, "fp4"), "int8": (8, None)}


@dataclass(frozen=True)
class QuantSpec:
    """How the frozen base weights are stored (bitsandbytes).

    ``bits=4`` stores each weight as a 4-bit code into a 16-value table: NF4 (QLoRA paper §3,
    quantiles of N(0, 1)) or FP4; one absmax constant per ``blocksize`` weights adds 32/64 = 0.5 bit
    per parameter, and double quantization (QLoRA §3) stores those constants in 8 bits, which cuts
    that to about 0.127 bit.  ``bits=8`` is LLM.int8() (Dettmers et al. 2022).

    ``compute_dtype=None`` picks bf16 on GPUs that have it, fp16 on those without (a T4); on a CPU
    bf16 where the chip multiplies bf16 natively and the model is at least 512 wide, else fp32
    (``lora_lab.hf.model.device``'s rule).  Shorthands: ``QuantSpec.parse("nf4" | "fp4" | "int8")``.
    """

    bits: Literal[4, 8] = 4
    quant_type: Literal["nf4", "fp4"] | None = "nf4"
    double_quant: bool = True
    compute_dtype: str | None = None

    def __post_init__(self):
        S = "QuantSpec"
        _check(self.bits in (4, 8) and _is_int(self.bits), S, "bits", self.bits,
               "bits must be 4 or 8", "pass bits=4 for QLoRA (NF4) or bits=8 for int8")
        if self.bits == 8:
            object.__setattr__(self, "quant_type", None)
            object.__setattr__(self, "double_quant", False)
        else:
            _check(self.quant_type in ("nf4", "fp4"), S, "quant_type", self.quant_type,
                   "quant_type must be 'nf4' or 'fp4' for 4 bits", "pass quant_type='nf4'")
        _check(self.compute_dtype in (None, "float32", "float16", "bfloat16"), S, "compute_dtype",
               self.compute_dtype, "compute_dtype must be None (automatic), 'float32', 'float16' or "
               "'bfloat16'", "leave compute_dtype=None to pick it from the device")

    @classmethod
    def parse(cls, value: "QuantSpec | str | None") -> "QuantSpec | None":
        """Accept a QuantSpec, None, or one of the shorthands ``"nf4"``, ``"fp4"``, ``"int8"``."""
        if value is None or isinstance(value, QuantSpec):
            return value
        if isinstance(value, str) and value.lower() in QUANT_SHORTHANDS:
            bits, qt = QUANT_SHORTHANDS[value.lower()]
            return cls(bits=bits, quant_type=qt)
        raise SpecError("QuantSpec", "quant", value, f"use a QuantSpec, None or one of "
                        f"{list(QUANT_SHORTHANDS)}", "pass quant='nf4' for QLoRA")

    @property
    def name(self) -> str:
        return "int8" if self.bits == 8 else f"{self.quant_type}{'+dq' if self.double_quant else ''}"


@dataclass(frozen=True)
class DataSpec:
    """How rows become training examples.

    A row is either ``{prompt_column: str, response_column: str}`` or
    ``{messages_column: [{"role": ..., "content": ...}, ...]}``.  The text is rendered with the
    tokenizer's chat template when it has one, else with ``template`` (a ``str.format`` pattern over
    ``prompt``), and the response follows, ended by the EOS token.

    ``train_on_responses_only`` sets the labels of prompt tokens to -100 so the loss is computed on
    the response alone.  Rows longer than ``max_length`` tokens are truncated (and counted); with
    ``packing`` several short rows share one ``max_length`` sequence.
    """

    prompt_column: str = "prompt"
    response_column: str = "response"
    messages_column: str = "messages"
    max_length: int = 512
    train_on_responses_only: bool = True
    eval_fraction: float = 0.1
    packing: bool = False
    use_chat_template: bool = True
    template: str = "{prompt}\n"
    seed: int = 0

    def __post_init__(self):
        S = "DataSpec"
        _check(_is_int(self.max_length) and self.max_length >= 2, S, "max_length", self.max_length,
               "max_length must be an integer >= 2", "pass max_length=512")
        _check(isinstance(self.eval_fraction, (int, float)) and 0.0 <= self.eval_fraction < 1.0, S,
               "eval_fraction", self.eval_fraction, "eval_fraction must be in [0, 1)",
               "pass eval_fraction=0.1, or 0 for no eval split")
        _check(isinstance(self.template, str) and "{prompt}" in self.template, S, "template",
               self.template, "template must contain '{prompt}'", "pass template='{prompt}\\n'")
        for col in ("prompt_column", "response_column", "messages_column"):
            _check(isinstance(getattr(self, col), str) and getattr(self, col), S, col,
                   getattr(self, col), f"{col} must be a non-empty column name",
                   f"pass {col}={self.__dataclass_fields__[col].default!r}, or the name of the "
                   "column in your dataset")

    def replace(self, **changes: Any) -> "DataSpec":
        return replace(self, **changes)


OPTIMIZERS = ("adamw", "adamw_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw", "sgd")
SCHEDULES = ("constant", "linear", "cosine")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


@dataclass(frozen=True)
class TrainSpec:
    """How to train an attached adapter.

    Training runs ``steps`` optimizer steps (or ``epochs`` passes when ``steps`` is None), each of
    ``batch_size × grad_accum`` examples.  The learning rate warms up linearly for ``warmup_steps``
    then follows ``schedule``.  ``precision="auto"`` is bf16 autocast where the chip has native bf16
    (GPUs from Ampere; CPUs with AVX512-BF16, AMX or Arm BF16, for models of hidden size >= 512),
    fp16 autocast on GPUs without bf16 (a T4), and fp32 on other CPUs; ``"fp32"`` forces fp32.
    Under bf16 autocast on a CPU the attention runs in fp32 (PyTorch's CPU flash attention is about
    twice as fast in fp32 there, and exact; ``lora_lab.hf.model.attention``).
    ``gradient_checkpointing`` trades about a third of the speed for activation memory; it is off
    unless you turn it on.  ``chunked_loss`` computes the
    LM head and the loss over chunks of ``loss_chunk_size`` tokens, so only one chunk's logits are
    ever held (``lora_lab.hf.training.chunked_loss``), with the same loss and gradients.
    ``"auto"`` (the default) turns it on for vocabularies of 32k tokens or more (Llama 2/3, Mistral,
    Qwen, SmolLM2), where the logits dominate a step; measured no slower there
    (``benchmarks/loss_memory.py``).  Models it cannot run on (prompt learning, soft-capped logits)
    keep the full loss under ``"auto"``.
    ``pad_to_multiple_of`` rounds each batch's padded length up to a multiple of this many tokens
    (never past the model's positions), as transformers' collators do for tensor cores; padding
    carries no loss, so losses and gradients are the same (``tests/train/test_padding.py``).  On a
    CPU it lowers the peak: SmolLM2 with notebook 07's batches (4 rows of 45–53 tokens, bf16,
    checkpointing) peaked at 1,003 MiB against 1,098 padded to the longest row, over 3 runs each
    (``benchmarks/padding.py``; 16 and 32 gave the same, so it is the alignment more than the
    number of shapes).  The price is the padding computed: 12.8% of real tokens there against 3.5%,
    tokens/s 0.94× (median; within run-to-run noise).  ``None`` pads to the longest row only.
    ``compile=True`` runs each decoder layer through ``torch.compile`` (TorchInductor) while
    training, fusing the norms, casts, rotary and activation kernels between the matrix products;
    the layers are eager again after the run, so generation is not recompiled per length
    (``lora_lab.hf.training.compile``).  The first step pays the compilation (25–30 s on 2 cores for
    SmolLM2, 4 s once inductor's disk cache is warm; its worker processes add about 400 MB
    meanwhile), so it is for runs of more than a few dozen steps on a real model: notebook 07's
    cell steps 1.34× faster, and 40 steps take 79 s cold, 39 s warm, 45 s eager
    (``benchmarks/compile.py``).  It needs a C++ compiler on a CPU (Triton and a C compiler on a
    GPU) and works with gradient checkpointing; losses match eager training within float rounding
    (``tests/train/test_compile.py``).
    Checkpoints (the adapter and what resuming needs; the newest three are kept) are written at the
    end of every run however it ends, every ``save_every`` steps, and once ``autosave_minutes`` of
    wall time have passed since the last one: a kernel killed from outside (out of memory, a Binder
    or Colab timeout), which no handler survives, loses at most that much training;
    ``train(..., resume_from=run_dir)`` continues from it.  None turns the timed save off.
    ``seed`` seeds torch when the run starts: the order of the examples, dropout and anything else
    drawn while training.  The adapter's random initial weights (LoRA's A) were drawn earlier, by
    ``attach``, from torch's global generator, which torch 2.13 seeds differently in each process:
    call ``torch.manual_seed(seed)`` before ``attach`` for the same adapter on every run.
    """

    steps: int | None = 100
    epochs: float | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    eval_every: int | None = None
    save_every: int | None = None
    autosave_minutes: float | None = 10.0
    seed: int = 0
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    output_dir: str | None = None
    log_every: int = 1
    chunked_loss: bool | Literal["auto"] = "auto"
    loss_chunk_size: int = 512
    pad_to_multiple_of: int | None = 8
    compile: bool = False

    def __post_init__(self):
        S = "TrainSpec"
        _check(self.steps is not None or self.epochs is not None, S, "steps", None,
               "give steps or epochs", "pass steps=100")
        if self.steps is not None:
            _check(_is_int(self.steps) and self.steps >= 1, S, "steps", self.steps,
                   "steps must be an integer >= 1", "pass steps=100")
        if self.epochs is not None:
            _check(isinstance(self.epochs, (int, float)) and self.epochs > 0, S, "epochs",
                   self.epochs, "epochs must be > 0", "pass epochs=1")
        for name in ("batch_size", "grad_accum", "log_every"):
            v = getattr(self, name)
            _check(_is_int(v) and v >= 1, S, name, v, f"{name} must be an integer >= 1",
                   f"pass {name}={self.__dataclass_fields__[name].default!r} or another positive integer")
        _check(isinstance(self.lr, (int, float)) and 0 < self.lr < 1, S, "lr", self.lr,
               "lr must be in (0, 1)", "pass lr=2e-4 for LoRA (1e-3 on tiny models)")
        _check(self.schedule in SCHEDULES, S, "schedule", self.schedule, f"choose one of {SCHEDULES}",
               "pass schedule='cosine'")
        _check(_is_int(self.warmup_steps) and self.warmup_steps >= 0, S, "warmup_steps",
               self.warmup_steps, "warmup_steps must be an integer >= 0",
               "pass warmup_steps=0, or about 5% of steps")
        _check(isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0, S,
               "weight_decay", self.weight_decay, "weight_decay must be >= 0",
               "pass weight_decay=0.0 (the LoRA default) or a small value such as 0.01")
        _check(self.max_grad_norm is None or (isinstance(self.max_grad_norm, (int, float))
               and self.max_grad_norm > 0), S, "max_grad_norm", self.max_grad_norm,
               "max_grad_norm must be None or > 0", "pass max_grad_norm=1.0")
        for name in ("eval_every", "save_every"):
            v = getattr(self, name)
            _check(v is None or (_is_int(v) and v >= 1), S, name, v,
                   f"{name} must be None or an integer >= 1",
                   f"pass {name}=None or a number of optimizer steps such as 50")
        _check(self.autosave_minutes is None or (isinstance(self.autosave_minutes, (int, float))
               and not isinstance(self.autosave_minutes, bool) and self.autosave_minutes > 0), S,
               "autosave_minutes", self.autosave_minutes, "autosave_minutes must be None or > 0",
               "pass autosave_minutes=10 (a checkpoint every 10 minutes of training) or None")
        _check(self.optimizer in OPTIMIZERS, S, "optimizer", self.optimizer,
               f"choose one of {OPTIMIZERS}", "pass optimizer='adamw'")
        _check(self.precision in PRECISIONS, S, "precision", self.precision,
               f"choose one of {PRECISIONS}", "pass precision='auto'")
        _check(isinstance(self.chunked_loss, bool) or self.chunked_loss == "auto", S, "chunked_loss",
               self.chunked_loss,
               "chunked_loss must be True, False or 'auto'", "pass chunked_loss='auto'")
        _check(_is_int(self.loss_chunk_size) and self.loss_chunk_size >= 1, S, "loss_chunk_size",
               self.loss_chunk_size, "loss_chunk_size must be a positive number of tokens",
               "pass loss_chunk_size=512 (it need not divide the sequence length)")
        m = self.pad_to_multiple_of
        _check(m is None or (_is_int(m) and m >= 1), S, "pad_to_multiple_of", self.pad_to_multiple_of,
               "pad_to_multiple_of must be None or a positive number of tokens",
               "pass pad_to_multiple_of=8 (the default) or None for no rounding")
        _check(isinstance(self.compile, bool), S, "compile", self.compile, "compile must be True or False",
               "pass compile=True to compile the decoder layers with torch.compile, or False (eager)")

    def replace(self, **changes: Any) -> "TrainSpec":
        return replace(self, **changes)
