"""Memory of fine-tuning on a GPU (or in CPU RAM), term by term: pure arithmetic on plain numbers.

The peak of one training step of a decoder-only transformer (Llama-shaped: RMSNorm, rotary
attention with grouped KV heads, SwiGLU MLP) is modelled as

    peak_allocated = base + quant_constants + adapter + optimizer
                     + max(activations + logits,  gradients + one layer of activations)
    peak_reserved  = peak_allocated + allocator overhead
    device need    = peak_reserved + CUDA context      (merge after training: merge peak + context)

The two arguments of ``max`` are the two moments a step can peak at: the end of the forward pass
(all activations and the loss's logits, no gradient yet) and the end of the backward pass (every
gradient, the activations freed).  With ``grad_accum > 1`` the gradients of the earlier
micro-batches stay allocated through the next forward, so the peak holds both.

Each term, in bytes (``c`` = bytes of the compute dtype: 2 for fp16/bf16, 4 for fp32;
``h`` hidden, ``i`` intermediate, ``kv`` = kv_heads·head_dim, ``V`` vocab, ``L`` layers,
``T = batch·seq_len`` tokens):

* **base** — the frozen (or, for full FT, trained) weights.  Frozen and unquantized: ``c``
  bytes/param.  Full FT: ``w`` bytes/param, the recipe's (:mod:`lora_lab.core.recipes`): 4 for
  fp32 on the CPU and for fp32 master weights under fp16 autocast (a T4), 2 for pure bf16.
  Quantized bases keep the embeddings, the LM head and the norms unquantized; peft's
  ``prepare_model_for_kbit_training`` (which :func:`lora_lab.attach` runs) casts those to fp32,
  so they cost 4 bytes/param on a QLoRA base.
  *4-bit* (QLoRA §3): 0.5 byte/param of packed codes.  *int8* (LLM.int8()): 1 byte/param.
* **quant_constants** — 4-bit: one fp32 absmax per block of 64 weights (32/64 = 0.5 bit/param);
  with double quantization the absmax are stored in 8 bits plus one fp32 constant per 256 absmax
  (8/64 + 32/(64·256) = 0.127 bit/param, QLoRA §3).  Computed per tensor with ceilings, as
  bitsandbytes stores them.  int8: one fp32 scale per output row.
* **adapter** — trainable parameters in their dtype (peft keeps adapter weights in fp32 by default:
  ``autocast_adapter_dtype=True``).  Full FT: all parameters, in ``w`` (counted once, in
  **base**).
* **gradients** — one gradient per trainable parameter, in the parameter's dtype (full FT: the
  weights' dtype).  The term is what is allocated *at the peak*: none at the end of the forward
  pass of a loop that frees them after each step (``zero_grad(set_to_none=True)``, as
  :func:`lora_lab.train` and ``transformers.Trainer`` do), all of them at the end of the backward
  pass or with ``grad_accum > 1``.  ``gradients_total`` is always all of them.  Full FT of tied
  embeddings adds ``2·V·h·w`` bytes of gradient temporaries at the end of the backward pass (the
  embedding's dense gradient and its sum with the LM head's: measured, torch's CPU allocator).
* **optimizer** — AdamW (torch): two moments per trainable parameter in the parameter's dtype
  (``exp_avg`` and ``exp_avg_sq`` are ``zeros_like(param)``): 2 × 4 bytes for fp32 adapters and
  for full FT of fp32 (master) weights, 2 × 2 for pure bf16 full FT.  So weights + gradients +
  AdamW are 4 + 4 + 8 = 16 bytes/param for fp32 and mixed fp16, 2 + 2 + 4 = 8 for pure bf16.
  8-bit AdamW (bitsandbytes): 2 × (1 byte + a fp32 absmax per 256 values).  The paged variants
  have the same size but can be evicted to CPU RAM under pressure.  SGD without momentum: 0.
* **activations** — what autograd keeps for the backward pass, per token and layer.  Derived for
  Llama the way Korthikanti et al. 2022 (§4.1, "Activations memory per transformer layer") derive
  ``sbh(34 + 5as/h)`` for GPT, but for SDPA/flash attention (no s² score matrix is kept) and for a
  *frozen* base, whose linear layers keep no input because no weight gradient is needed:

  - 2 RMSNorms, each keeping its fp32 upcast input: ``2·4h``;
  - attention: SDPA keeps q, k, v and its output: ``c·(2h + 2kv)``; with a padding mask
    transformers repeats the KV heads first, so ``c·4h``;
  - SwiGLU: ``silu(gate)`` keeps gate, ``act·up`` keeps both: ``3·c·i`` (``3·4·i`` on a k-bit
    base prepared by peft: its fp32 embeddings make the residual stream fp32, and bitsandbytes'
    layers return their input's dtype);
  - full FT also keeps every linear input for the weight gradients, and the norms' normalised
    input for their weight gradients: ``+ c·(5h + i)``.  With fp32 master weights under 16-bit
    autocast the residual stream is fp32: the norms keep fp32 normalised inputs and q, k, v, gate
    and up each cast their fp32 input separately: ``+ 2·4h + c·(6h + i)`` instead; and autocast's
    16-bit copy of every linear weight (``c·N_lin``, LM head included) lives to the forward's end;
  - each LoRA module keeps its (cast) input and ``A·x``: ``+ c·(in + r)``; with dropout a mask
    and the dropped input: ``+ (1 + c)·in``; DoRA also keeps the base output and the LoRA output,
    both linear outputs in ``c`` under autocast: ``+ 2c·out`` (peft 0.21, counted with
    ``saved_tensors_hooks``: tests/core/test_memory.py).  Without autocast (a 16-bit base, fp32
    adapters) peft casts the adapter input to fp32, which keeps ``4·(in + r)`` and a fp32 LoRA
    output: more than modelled here.  Each IA3 module keeps what its vector's gradient needs
    (peft 0.21's forward): a feed-forward module its input cast to the fp32 vector's dtype,
    ``+ 4·in``; any other its base output, ``+ c·out`` (Liu et al. 2022, §3.3: IA3 scales the
    keys, the values and the feed-forward activations).

  Without checkpointing: ``T·L·layer``.  With gradient checkpointing only each layer's input is
  kept (``T·L·c·h``; ``T·L·4h`` where the residual stream is fp32: a prepared k-bit base, fp32
  master weights) and one layer is recomputed at a time (``+ T·layer``).  Plus the final norm
  (``T·4h``) and, for padded batches, the boolean mask (``batch·seq²``) shared by all layers.
  Batches count as padded when ``batch > 1`` unless told.  On a k-bit base add one dequantized
  weight (``max(out·in)·c``): bitsandbytes dequantizes each weight for its matmul, one at a time.
* **logits** — ``T·V`` values: the LM head output in ``c``, upcast to fp32 for the loss, whose
  log-softmax output (fp32) is kept.  In the forward the logits, their fp32 copy and the
  log-probs coexist (``c + 8`` bytes per value); in the backward the log-probs, their gradient and
  the input gradient (``12``).  So ``T·V·max(c + 8, 12)``, for a loop that drops the model
  outputs before ``backward()`` as :func:`lora_lab.train` and ``transformers.Trainer`` do
  (holding them adds ``T·V·c``).  At V = 128k this dominates short-context LoRA.
  With the **chunked loss** (``TrainSpec.chunked_loss``, :mod:`lora_lab.hf.training.chunked_loss`)
  only one chunk of ``C`` tokens is alive: ``min(C, T)·V·max(c + 8, 12)`` for a trained head (each
  chunk recomputed in the backward), ``min(C, T)·V·c`` plus one fp32 block of
  :data:`LOSS_BLOCK_BYTES` (none when c = 4) for a frozen one: its gradient is taken in the
  forward, written over the head's output in place.  ``"auto"`` chooses it for ``V ≥ 32k``.
* **allocator overhead** — the caching allocator rounds and fragments: ``reserved − allocated``,
  modelled as a fraction (default 10%) of the dynamic memory at the peak (the activations, logits
  and gradients, which each step allocates and frees).  On the CPU glibc's malloc keeps freed
  tensors in its heap, so the resident size grows over the first steps: :data:`CPU_FRAGMENTATION`
  (45%, fitted to the peak RSS of SmolLM2-135M fp32 LoRA and full FT, batch 8 × 64, 3 steps; see
  ``benchmarks/memory_accuracy.py --cpu-rss``).
* **CUDA context** — CUDA runtime, cuBLAS and kernels: ~0.3–0.5 GB that ``nvidia-smi`` shows but
  ``torch.cuda.max_memory_*`` never counts (:data:`CUDA_CONTEXT`, 0.45 GiB).  On the CPU the term
  is the process before any tensor: Python, torch, transformers, peft, bitsandbytes, lora_lab
  (:data:`CPU_RUNTIME`: 0.47 GiB resident was measured after these imports, x86-64 Linux).
* **merge peak** — after training: merging a LoRA into a 16-bit base needs one extra
  ``out × in`` delta at a time; on a quantized base the safe path dequantizes the whole base
  (``c`` bytes/param of the quantized layers).

Storage of quantized weights (no training): :func:`quant_storage` and :class:`QuantStorage`, in
:mod:`lora_lab.core.quant_storage` (re-exported here).

Assumptions: a frozen base stored in the compute dtype; full FT per its recipe (fp32 master
weights where the compute dtype is fp16, pure bf16, or fp32); autocast to the compute dtype; SDPA
without an ``s²`` score matrix (flash / memory-efficient kernels); fused AdamW (no per-step
temporaries).  Measurements: ``benchmarks/memory_accuracy.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .logits import (
    CHUNKED_LOSS_MIN_VOCAB,
    DEFAULT_LOSS_CHUNK,
    LOSS_BLOCK_BYTES,
    logits_bytes,
    loss_block_rows,
    resolve_loss_chunk,
)
from .quant_storage import QuantStorage, quant_storage

__all__ = ["AMBIGUOUS_DEVICES", "CPU", "CPU_FRAGMENTATION", "CPU_RUNTIME", "CUDA_CONTEXT", "DEVICES",
           "GIB", "OPTIMIZERS", "Architecture", "QuantLayout", "QuantStorage", "TrainableLayout",
           "activation_bytes", "device_bytes", "four_bit_bytes", "int8_bytes", "layer_activation_bytes",
           "logits_bytes", "memory_terms", "optimizer_bytes_per_param", "quant_storage", "verdict",
           "CHUNKED_LOSS_MIN_VOCAB", "DEFAULT_LOSS_CHUNK", "LOSS_BLOCK_BYTES", "loss_block_rows",
           "resolve_loss_chunk"]

GIB = 2**30
# Memory of each card in GiB (2**30 bytes), the unit of every size in this module and of a number
# passed as ``device``; the CUDA context is a separate term of the estimate.
DEVICES: dict[str, float] = {"T4": 16, "L4": 24, "A10G": 24, "A100-40GB": 40, "A100-80GB": 80, "H100": 80}
# Names sold with more than one memory size: an error lists the choices instead of guessing.
AMBIGUOUS_DEVICES: dict[str, tuple[str, ...]] = {"A100": ("A100-40GB", "A100-80GB")}
CPU = "CPU system RAM"                  # the label of device="cpu"
CUDA_CONTEXT = 0.45 * GIB               # CUDA runtime + cuBLAS + kernels (not in torch's counters)
CPU_RUNTIME = 0.47 * GIB                # resident size of Python + torch + transformers + peft
CPU_FRAGMENTATION = 0.45                # glibc heap kept after freeing, share of dynamic memory
OPTIMIZERS = ("adamw", "adamw_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw", "sgd")


def device_bytes(device: str | float, system_ram: int | None = None) -> tuple[str, int]:
    """``(label, bytes)`` of a device: a name from :data:`DEVICES`, a number of GiB (label
    ``"24 GiB"``), or ``"cpu"``: the machine's RAM, ``system_ram`` bytes (label :data:`CPU`).
    Raises ``ValueError`` for an unknown or ambiguous name (``"A100"``: 40 or 80 GB)."""
    if isinstance(device, (int, float)) and not isinstance(device, bool):
        if not (math.isfinite(device) and device > 0):
            raise ValueError(f"device memory must be a positive number of GiB, got {device!r}")
        return f"{device:g} GiB", int(device * GIB)
    name = str(device).strip()
    if name.lower() == "cpu":
        if not system_ram:
            raise ValueError("device='cpu' needs the machine's RAM (system_ram bytes)")
        return CPU, int(system_ram)
    choices = {k.lower(): v for k, v in AMBIGUOUS_DEVICES.items()}.get(name.lower())
    if choices:
        raise ValueError(f"{device!r} is ambiguous: it is sold as {' and as '.join(choices)}, "
                         f"which differ in memory; choose one of {list(choices)}")
    key = {k.lower(): k for k in DEVICES}.get(name.lower())
    if key is None:
        raise ValueError(f"unknown device {device!r}: choose one of {[*DEVICES, 'cpu']} or a "
                         f"number of GiB")
    return key, int(DEVICES[key] * GIB)


@dataclass(frozen=True)
class Architecture:
    """The shapes the activation and logit terms need (Llama naming)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool = False       # the LM head shares the embedding's weight

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def four_bit_bytes(numel: int, blocksize: int = 64, double_quant: bool = False,
                   nested_blocksize: int = 256) -> tuple[int, int]:
    """``(packed_bytes, constant_bytes)`` of one tensor in bitsandbytes' 4-bit format.

    Codes: two per byte, ``ceil(n/2)``.  Constants: one fp32 absmax per block of ``blocksize``;
    with double quantization one uint8 per block plus one fp32 per ``nested_blocksize`` blocks
    (QLoRA §3).
    """
    blocks = -(-numel // blocksize)
    consts = blocks + 4 * -(-blocks // nested_blocksize) if double_quant else 4 * blocks
    return -(-numel // 2), consts


def int8_bytes(rows: int, cols: int) -> tuple[int, int]:
    """``(int8_bytes, scale_bytes)`` of an LLM.int8() weight: one byte each plus a fp32 per row."""
    return rows * cols, 4 * rows


@dataclass(frozen=True)
class QuantLayout:
    """How the base is quantized: ``bits`` 4 or 8, ``blocksize``, ``double_quant``, and the
    ``(out, in)`` shapes of the quantized linear weights."""

    bits: int
    shapes: tuple[tuple[int, int], ...]
    blocksize: int = 64
    double_quant: bool = True

    def storage(self) -> tuple[int, int]:
        """``(packed weight bytes, quantization-constant bytes)`` summed over the shapes."""
        packed = consts = 0
        for out, inp in self.shapes:
            p, k = (four_bit_bytes(out * inp, self.blocksize, self.double_quant) if self.bits == 4
                    else int8_bytes(out, inp))
            packed, consts = packed + p, consts + k
        return packed, consts

    @property
    def numel(self) -> int:
        return sum(o * i for o, i in self.shapes)


@dataclass(frozen=True)
class TrainableLayout:
    """What is trained: ``params`` parameters stored in ``param_bytes`` each (their gradients and
    AdamW moments too).  ``full`` = every parameter (full fine-tuning; ``param_bytes`` 4 under a
    16-bit compute dtype means fp32 master weights, and ``autocast_copies`` counts the weights
    autocast copies to 16 bits during the forward).  Otherwise adapters: per adapted module
    ``(in, out, r)`` (all layers) for the activation term; ``extra_tokens``: virtual tokens
    prepended (prompt tuning)."""

    params: int
    param_bytes: int = 4
    full: bool = False
    modules: tuple[tuple[int, int, int], ...] = ()   # (in, out, r) of every adapted module
    dropout: bool = False
    dora: bool = False
    extra_tokens: int = 0                             # prefix/prompt virtual tokens
    autocast_copies: int = 0                          # weights autocast copies in the forward
    ia3: tuple[tuple[int, int, bool], ...] = ()       # (in, out, feed-forward) of every IA3 module

    def master_weights(self, c: int) -> bool:
        """Full FT of ``param_bytes`` weights under a ``c``-byte autocast: fp32 master weights."""
        return self.full and self.param_bytes > c


def optimizer_bytes_per_param(optimizer: str, param_bytes: int) -> float:
    """Optimizer state per trainable parameter (see the module docstring)."""
    if optimizer in ("adamw", "adamw_fused", "paged_adamw"):
        return 2.0 * param_bytes
    if optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        return 2.0 * (1 + 4 / 256)
    if optimizer == "sgd":
        return 0.0
    raise ValueError(f"unknown optimizer {optimizer!r}: choose one of {OPTIMIZERS}")


def layer_activation_bytes(arch: Architecture, c: int, full: bool, *, padded: bool = False,
                           fp32_stream: bool = False, master: bool = False) -> int:
    """Bytes per token kept by one decoder layer of the base (no adapters).

    ``padded``: an attention mask is passed, so SDPA gets KV heads repeated to ``h`` (and keeps
    those copies).  ``fp32_stream``: the residual stream is fp32 (a k-bit base prepared by peft:
    fp32 embeddings), so bitsandbytes' layers return fp32 and SwiGLU keeps fp32 tensors.
    ``master`` (full FT of fp32 weights under a 16-bit autocast): the norms keep their fp32
    normalised inputs (``2·4h``) and q, k, v, gate and up each keep their own 16-bit cast of their
    fp32 input (``c·(6h + i)`` of linear inputs, against ``c·(5h + i)`` with the norms' copies).
    """
    h, i = arch.hidden, arch.intermediate
    kv = h if padded else arch.kv_dim
    mlp = 4 if fp32_stream else c
    frozen = 2 * 4 * h + c * (2 * h + 2 * kv) + 3 * mlp * i
    if not full:
        return frozen
    return frozen + (2 * 4 * h + c * (6 * h + i) if master else c * (5 * h + i))


def _adapter_activation_bytes(t: TrainableLayout, c: int, layers: int) -> float:
    """Bytes per token per layer kept by the adapters (averaged over layers)."""
    total = 0
    for fin, fout, r in t.modules:
        total += c * (fin + r)
        if t.dropout:
            total += (1 + c) * fin
        if t.dora:                          # base output and LoRA output, autocast to c
            total += 2 * c * fout
    for fin, fout, feedforward in t.ia3:    # what the vector's gradient needs (peft's IA3 forward):
        total += 4 * fin if feedforward else c * fout  # the fp32 input it scales, or the output
    return total / max(layers, 1)


def activation_bytes(arch: Architecture, trainable: TrainableLayout, batch: int, seq: int,
                     checkpointing: bool, c: int, *, padded: bool = False,
                     fp32_stream: bool = False) -> tuple[float, float]:
    """``(activations kept at the end of the forward, one layer's worth)`` in bytes."""
    seq = seq + trainable.extra_tokens
    T = batch * seq
    master = trainable.master_weights(c)
    layer = layer_activation_bytes(arch, c, trainable.full, padded=padded, fp32_stream=fp32_stream,
                                   master=master)
    layer += _adapter_activation_bytes(trainable, c, arch.layers)
    shared = T * 4 * arch.hidden + (batch * seq * seq if padded else 0)  # final norm, bool mask
    if checkpointing:
        stream = 4 if (fp32_stream or master) else c
        kept = T * arch.layers * stream * arch.hidden + T * layer
    else:
        kept = T * arch.layers * layer
    return kept + shared, T * layer


def memory_terms(*, arch: Architecture, total_params: int, unquantized_params: int,
                 trainable: TrainableLayout, quant: QuantLayout | None = None,
                 batch: int = 1, seq: int = 512, checkpointing: bool = True,
                 optimizer: str = "adamw", compute_bytes: int = 2,
                 cuda_context: float = CUDA_CONTEXT, fragmentation: float = 0.10,
                 padded: bool | None = None, grad_accum: int = 1,
                 loss_chunk: int | None = None) -> dict[str, float]:
    """Every term of the estimate, in bytes (see the module docstring for the formulas).

    ``total_params``: all parameters of the base.  ``unquantized_params``: those that stay in
    floating point when ``quant`` is given (embeddings, LM head, norms); with ``quant=None`` all
    ``total_params`` are stored in ``compute_bytes`` (frozen) or ``trainable.param_bytes`` (full
    FT: 4 under a 16-bit ``compute_bytes`` means fp32 master weights).  ``padded``: batches carry an attention
    mask with padding (default: ``batch > 1``); ``False`` for packed or single sequences.
    ``grad_accum``: micro-batches per optimizer step; above 1 the gradients are held at the peak.
    ``loss_chunk``: tokens per chunk of the chunked loss (None: the full-vocabulary loss).
    """
    c = compute_bytes
    pbytes = trainable.param_bytes                 # trained weights, their gradients and moments
    if quant is None:                              # full FT: the recipe's weights (fp32 master...)
        base, consts = total_params * (pbytes if trainable.full else c), 0
    else:
        packed, consts = quant.storage()
        base = packed + unquantized_params * 4   # peft casts the unquantized rest to fp32
    adapter = 0 if trainable.full else trainable.params * pbytes   # full FT: counted in ``base``
    grads = trainable.params * pbytes
    opt = trainable.params * optimizer_bytes_per_param(optimizer, pbytes)
    padded = batch > 1 if padded is None else bool(padded)
    acts, one_layer = activation_bytes(arch, trainable, batch, seq, checkpointing, c,
                                       padded=padded, fp32_stream=quant is not None)
    frozen_head = not trainable.full and all(out != arch.vocab for _, out, _ in trainable.modules)
    logits = logits_bytes(arch, batch, seq + trainable.extra_tokens, c, loss_chunk, frozen_head)
    if quant is not None:     # bitsandbytes dequantizes one weight at a time for its matmul
        acts += max((o * i for o, i in quant.shapes), default=0) * c
    acts += trainable.autocast_copies * c      # fp32 master weights: autocast's 16-bit copies
    held = grads if grad_accum > 1 else 0.0    # earlier micro-batches' gradients, through a forward
    tied = 2 * arch.vocab * arch.hidden * pbytes if trainable.full and arch.tied_embeddings else 0
    if acts + logits + held >= grads + one_layer + tied:    # end of forward
        peak_acts, peak_logits, peak_grads = acts, logits, held
    else:                                                   # end of backward
        peak_acts, peak_logits, peak_grads = one_layer, 0.0, grads + tied
    overhead = fragmentation * (peak_acts + peak_logits + peak_grads)   # allocated, freed each step
    if trainable.full:
        merge = base                                # nothing to merge: the weights are trained
    elif quant is not None:                         # safe path: dequantize the base, then merge
        biggest = max((o * i for o, i in quant.shapes), default=0)
        merge = unquantized_params * 4 + quant.numel * c + adapter + biggest * c
    else:                                           # one 16-bit delta out x in at a time
        merge = base + adapter + _largest_linear(arch) * c
    return {
        "base_weights": float(base), "quant_constants": float(consts),
        "adapter_weights": float(adapter), "gradients": float(peak_grads),
        "optimizer_states": float(opt), "activations": float(peak_acts),
        "logits": float(peak_logits), "allocator_overhead": float(overhead),
        "cuda_context": float(cuda_context), "merge_peak": float(merge),
        "gradients_total": float(grads),
    }


def _largest_linear(arch: Architecture) -> int:
    return max(arch.hidden * arch.intermediate, arch.hidden * arch.hidden)


def verdict(need: float, capacity: float) -> str:
    """``"fits"`` under 90% of the device, ``"tight"`` up to 100%, else ``"does not fit"``."""
    if need <= 0.9 * capacity:
        return "fits"
    return "tight" if need <= capacity else "does not fit"
