"""A causal-LM loss that never holds the full-vocabulary logits: the LM head and the cross-entropy
run over chunks of tokens, one chunk of logits alive at a time.

The usual loss (transformers' ``ForCausalLMLoss``) computes, for a batch of B rows of T tokens::

    h      = decoder(input_ids)                  (B, T, H)   final hidden states, after the norm
    logits = lm_head(h).float()                  (B, T, V)   fp32, kept for the backward
    loss   = Σ_t CE(logits[:, t], labels[:, t+1]) / n        labels ≠ -100 only; n of them

so a step holds ``B·T·V`` logit values in 16-bit, their fp32 copy and the log-probs: about
``12·B·T·V`` bytes, 12.6 GB for 4 × 2048 tokens of a 128k vocabulary (Llama 3), more than a 1B
model's weights, activations and optimizer together.

Here the ``N = B·(T-1)`` positions that have a next token are flattened and cut into chunks of
``C`` tokens (the last one shorter).  For each chunk, under :func:`torch.utils.checkpoint.checkpoint`::

    ℓ_chunk = Σ_{t ∈ chunk} CE(lm_head(h_t).float(), y_t)          (C, V) logits, freed at once

At any moment at most one chunk's ``C·V`` logits (and their gradient) are alive: the extra peak
is ``C·V·c`` bytes plus one fp32 block of rows with a frozen head and ``C·V·max(c + 8, 12)`` with a
trained one (``c`` = bytes of the compute dtype, :func:`lora_lab.core.memory.logits_bytes`),
instead of ``B·T·V·max(c + 8, 12)`` for the full loss.  Two ways:

- **frozen head** (LoRA/QLoRA without ``lm_head`` among the targets: the usual case): the chunk's
  gradient ``∂ℓ_chunk/∂h`` (C, H) is computed in the forward pass, right after its loss, and kept
  (N·H values in all, the size of ``h``); the backward only scales it by the incoming gradient
  (ℓ is linear in each ``ℓ_chunk``).  The same two head matmuls per token as the full loss
  (logits, then the gradient to ``h``), so no recomputation (Liger's fused linear cross-entropy
  does the same);
- **trainable head** (``lm_head`` adapted, or trained): each chunk runs under
  :func:`torch.utils.checkpoint.checkpoint`, which keeps only the chunk's hidden states and
  recomputes its logits when the backward reaches it, so the head's weights get their gradients
  in the backward as usual.  The price is one more head matmul per token (``2·H·V`` FLOPs).

The result is ``(Σ ℓ, n)``: the *sum* of the per-token losses and the number of supervised tokens,
so that gradient accumulation can weight micro-batches by tokens exactly
(:mod:`lora_lab.train.step`: ``loss_step = Σ ℓ / N_step``).  Same label shift as transformers (the
label at t+1 for the logits at t), same ``ignore_index=-100``, same fp32 upcast, same autocast: the
loss and gradients match ``model(**batch).loss`` to fp32 rounding (tested to 1e-5 relative).

What it needs of the model: a causal LM whose logits are ``lm_head(decoder(...))`` — Llama,
Mistral, Qwen, SmolLM, Phi-3 ... — with or without a peft wrapper (LoRA, DoRA, IA3: the adapters
live inside the modules, so they run here too; an adapted or trainable ``lm_head`` is just another
module called per chunk).  It refuses, with the reason, prompt-learning adapters (their virtual
tokens are added by peft's forward, which this bypasses) and models that transform the logits
after the head (Gemma 2/3's soft-capping, Cohere's ``logit_scale``, Granite's ``logits_scaling``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ...core.logits import loss_block_rows
from ...core.memory import CHUNKED_LOSS_MIN_VOCAB, DEFAULT_LOSS_CHUNK
from ...errors import TrainingError
from .._peft import is_peft

__all__ = ["DEFAULT_CHUNK_SIZE", "AUTO_MIN_VOCAB", "IGNORE_INDEX", "ChunkedLossMixin",
           "chunked_unsupported", "chunked_causal_lm_loss", "check_chunk_size", "output_layer",
           "vocab_size", "use_chunked"]

IGNORE_INDEX = -100
DEFAULT_CHUNK_SIZE = DEFAULT_LOSS_CHUNK
"""Tokens per chunk.  At V = 128k a trained head's chunk costs 512·V·12 B ≈ 0.8 GB (fp16 compute),
a frozen head's 512·V·2 B + 16 MiB ≈ 0.15 GB, against 12.6 GB for the full logits of 4 × 2048
tokens, and a (512 × H)·(H × V) matmul still keeps a GPU busy, so cutting the head into chunks
costs no more than its FLOPs."""
AUTO_MIN_VOCAB = CHUNKED_LOSS_MIN_VOCAB
"""``chunked_loss="auto"`` turns it on from this vocabulary size (Llama 2, Mistral: 32k; SmolLM2:
49k; Qwen: 151k; Llama 3: 128k).  There the full logits cost ``12·V`` = 384 kB per token or more,
several times a small model's per-token activations.  With a frozen head (LoRA, QLoRA) the chunked
loss runs the same head matmuls as the full loss and fewer passes over the logits, so it is no
slower (``benchmarks/loss_memory.py``, measured on a CPU: see the README).  Below it (GPT-2-sized toy
vocabularies, lora_lab's builtin models) the logits are small and the plain loss is kept: there is
nothing to save, and a trainable head's chunks would be recomputed (one more head matmul)."""
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def check_chunk_size(chunk_size) -> int:
    """``chunk_size`` when it is a positive integer, else a :class:`TrainingError` with the fix."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise TrainingError(f"The loss chunk size must be a positive number of tokens, not "
                            f"{chunk_size!r}.",
                            f"pass loss_chunk_size={DEFAULT_CHUNK_SIZE} (any positive integer: "
                            "it need not divide the sequence length; the last chunk is shorter)")
    return chunk_size


def _causal_lm(model):
    """The transformers model under a peft wrapper (or ``model`` itself)."""
    return model.get_base_model() if is_peft(model) else model


def chunked_unsupported(model) -> str | None:
    """Why the chunked loss cannot run on ``model`` (a sentence), or None when it can."""
    config = getattr(model, "active_peft_config", None)
    if getattr(config, "is_prompt_learning", False):
        return (f"its {config.peft_type.value if hasattr(config.peft_type, 'value') else config.peft_type} "
                "adapter adds virtual tokens in peft's forward, which the chunked loss bypasses")
    lm = _causal_lm(model)
    cfg = getattr(lm, "config", None)
    for name in _LOGIT_TRANSFORMS:
        value = getattr(cfg, name, None)
        if value not in (None, 1, 1.0):
            return f"{type(lm).__name__} transforms its logits after the LM head ({name}={value})"
    get_head, get_decoder = getattr(lm, "get_output_embeddings", None), getattr(lm, "get_decoder", None)
    head = get_head() if callable(get_head) else None
    decoder = get_decoder() if callable(get_decoder) else None
    if head is None or decoder is None or decoder is lm:
        return (f"{type(lm).__name__} does not expose its output layer and decoder "
                "(get_output_embeddings() and get_decoder())")
    return None


def output_layer(model):
    """``(decoder, lm_head)`` of a causal LM (peft-wrapped or not), or a :class:`TrainingError`."""
    why = chunked_unsupported(model)
    if why is not None:
        raise TrainingError(f"The chunked loss cannot run on this model: {why}.",
                            "train with TrainSpec(chunked_loss=False) (the full-vocabulary loss)")
    lm = _causal_lm(model)
    return lm.get_decoder(), lm.get_output_embeddings()


def vocab_size(model) -> int | None:
    """The number of logits per token (the LM head's outputs), or None when there is no head."""
    get_head = getattr(_causal_lm(model), "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    weight = getattr(head, "weight", None)
    if weight is not None and weight.dim() == 2:
        return int(weight.shape[0])
    return getattr(getattr(model, "config", None), "vocab_size", None)


def use_chunked(setting, model) -> bool:
    """Resolve ``TrainSpec.chunked_loss`` for ``model``: True/False as given (True on a model that
    cannot refuses with the reason); ``"auto"``: on when the vocabulary is ≥ :data:`AUTO_MIN_VOCAB`
    and the model supports it."""
    if setting == "auto":
        return (vocab_size(model) or 0) >= AUTO_MIN_VOCAB and chunked_unsupported(model) is None
    if setting:
        output_layer(model)  # raises with the reason
    return bool(setting)


def _chunk_loss(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Σ CE over one chunk: hidden (C, H), targets (C,) → a scalar; the (C, V) logits die here."""
    logits = head(hidden).float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


class _FrozenHeadLoss(torch.autograd.Function):
    """``Σ_chunks ℓ_chunk`` with ``∂/∂h`` computed chunk by chunk in the forward (a frozen head).

    forward(hidden (N, H), targets (N,), head, chunk_size) → the fp32 sum; backward(g) → g·∂Σℓ/∂h.
    Autocast applies inside as it does around it, so the head runs in the autocast dtype."""

    @staticmethod
    def forward(ctx, hidden, targets, head, chunk_size):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.zeros_like(hidden)                                   # (N, H)
        for start in range(0, targets.numel(), chunk_size):
            y = targets[start:start + chunk_size]
            if not bool((y != IGNORE_INDEX).any()):
                continue  # nothing supervised in this chunk: its loss and gradient are 0
            part, g = _chunk_loss_and_grad(head, hidden[start:start + chunk_size], y)
            grad[start:start + chunk_size] = g
            total += part
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None


def _chunk_loss_and_grad(head, hidden: torch.Tensor, targets: torch.Tensor):
    """``(Σ CE, ∂ΣCE/∂hidden)`` of one chunk, hidden (C, H), targets (C,), for a frozen head.

    ``z = head(h).float()`` (C, V); ``ℓ_t = logsumexp(z_t) − z_t[y_t]``; ``∂ℓ_t/∂z_t = softmax(z_t)
    − onehot(y_t)`` (zero rows where ``y_t = -100``), taken back through the head by autograd
    (``grad_outputs``).

    The logits are turned into their gradient **in place**, one block of rows at a time
    (:func:`lora_lab.core.logits.loss_block_rows`: 16 MiB of fp32 values, 85 rows of SmolLM2's
    49,152 logits, 32 of Llama 3's 128,256, small enough to stay in a server CPU's last-level
    cache through the block's passes, the planner's term): each block is copied into one
    fp32 buffer (worked on where it is when the head runs in fp32), its log-sum-exp built from the passes the
    softmax needs (``m = max z_t``, ``e = exp(z_t − m)``, ``lse = m + log Σe``, ``softmax = e / Σe``),
    and the gradient written back over the head's output, in the head's dtype.  That is safe for
    heads whose backward keeps their inputs, not their output: ``nn.Linear``, bitsandbytes' 4- and
    8-bit layers, peft's LoRA and DoRA (a saved output would make autograd raise; a custom
    ``autograd.Function`` keeping its output outside ``save_for_backward``, or a forward hook
    holding it, would see the gradient instead).  Ignored rows are zeroed whatever their logits
    (an fp16 overflow to ±inf there leaves the loss finite, as in ``F.cross_entropy``).  So a
    16-bit head holds ``C·V`` 16-bit values and one fp32 block, not its
    output, an fp32 copy and a 16-bit copy of the gradient (``C·V·(2c + 4)`` bytes before: 201 MB
    against 67 MB for 512 tokens of SmolLM2's 49,152), and the block's passes stay in the CPU's
    cache: the whole function, both head matmuls included, took 187–198 ms against 231–258 ms with
    whole-chunk passes, for 504 tokens of SmolLM2 in bf16 (2-core CPU), the same gradient bit for bit.
    ``torch.logsumexp`` is not used: on a CPU it allocates two (C, V) temporaries."""
    with torch.enable_grad():
        h = hidden.detach().requires_grad_()
        out = head(h)                                          # (C, V), the compute dtype
    logits = out.detach()                                      # becomes ∂ΣCE/∂logits, in place
    valid = targets != IGNORE_INDEX
    safe = torch.where(valid, targets, 0)[:, None]             # (C, 1)
    weight = valid[:, None].to(torch.float32)                  # (C, 1): 0 on ignored rows
    part = torch.zeros((), dtype=torch.float32, device=logits.device)
    rows = min(loss_block_rows(logits.shape[1]), logits.shape[0])
    fp32 = logits.dtype == torch.float32
    buffer = None if fp32 else torch.empty(rows, logits.shape[1], dtype=torch.float32, device=logits.device)
    for start in range(0, logits.shape[0], rows):
        block = logits[start:start + rows]
        z = block if fp32 else buffer[:block.shape[0]].copy_(block)  # (b, V) fp32, one block alive
        y, w = safe[start:start + rows], weight[start:start + rows]
        z_y = z.gather(1, y)                                   # (b, 1): the target's logit
        m = z.amax(dim=-1, keepdim=True)                       # (b, 1)
        total = z.sub_(m).exp_().sum(dim=-1, keepdim=True)     # z is now e = exp(z − m)
        part += torch.where(w > 0, total.log() + m - z_y, 0).sum()  # Σ (lse − z_y), supervised rows
        z.mul_(w / total).masked_fill_(w == 0, 0).scatter_add_(1, y, -w)  # softmax − onehot(y); 0 if ignored
        if not fp32:
            block.copy_(z)                                     # back into the head's dtype
    (g,) = torch.autograd.grad(out, h, grad_outputs=logits)
    return part, g


def _head_trainable(head) -> bool:
    return any(p.requires_grad for p in head.parameters())


def chunked_causal_lm_loss(model, batch: dict, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                           **forward_kwargs) -> tuple[torch.Tensor, int]:
    """``(Σ ℓ, n)`` of a causal-LM batch, one chunk of ``chunk_size`` tokens of logits at a time.

    ``batch``: ``input_ids`` and ``labels`` (B, T), plus ``attention_mask`` or ``position_ids``
    (packed rows), passed to the decoder as the model's own forward would.  ``Σ ℓ``: a fp32 scalar,
    the summed cross-entropy over the n supervised tokens (``labels[:, 1:] != -100``); divide it
    by n (or by the step's N) for the mean.  Under autocast the head runs in the autocast dtype
    and the loss in fp32, as in transformers.  With gradients enabled, a frozen head's chunks give
    their gradients in the forward and a trainable head's chunks are checkpointed (module
    docstring); without (evaluation), chunks are simply computed one after another.
    """
    chunk_size = check_chunk_size(chunk_size)
    decoder, head = output_layer(model)
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = decoder(**inputs, **forward_kwargs).last_hidden_state             # (B, T, H)
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])                      # (N, H), N = B·(T-1)
    targets = labels[:, 1:].reshape(-1).to(hidden.device)                      # (N,): next tokens
    n = int((targets != IGNORE_INDEX).sum())
    grad = torch.is_grad_enabled()
    if grad and hidden.requires_grad and not _head_trainable(head):
        return _FrozenHeadLoss.apply(hidden, targets, head, chunk_size), n
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_size):
        h, y = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        if not bool((y != IGNORE_INDEX).any()):
            continue  # nothing supervised in this chunk: its loss and gradient are 0
        if grad:
            part = checkpoint(_chunk_loss, head, h, y, use_reentrant=False)
        else:
            part = _chunk_loss(head, h, y)
        total = total + part
    return total, n


class ChunkedLossMixin:
    """Put before ``transformers.Trainer`` (or TRL's ``SFTTrainer``) to train with the chunked loss::

        from transformers import Trainer
        from lora_lab.hf.training.chunked_loss import ChunkedLossMixin

        class MyTrainer(ChunkedLossMixin, Trainer):
            chunked_loss = "auto"          # True, False or "auto", as in TrainSpec
            loss_chunk_size = 512

        trainer = MyTrainer(model, args, ..., callbacks=[lora_lab.LiveCallback(dash)])

    ``compute_loss`` then returns the Trainer's own loss, computed one chunk of logits at a time:
    with ``num_items_in_batch`` (the supervised tokens of the whole accumulated step, which the
    Trainer passes to models that take loss kwargs: every causal LM in transformers)
    ``Σ ℓ / num_items_in_batch``, which the Trainer treats as already scaled for gradient
    accumulation; else the micro-batch mean ``Σ ℓ / n``, which it divides by the accumulation
    steps — the two rules of ``Trainer.compute_loss``.  The head runs under the accelerator's
    autocast (fp16/bf16), as the model's own forward does there.

    The full loss is kept (the parent's ``compute_loss``) for evaluation (``return_outputs``: the
    Trainer wants the logits), label smoothing or a ``compute_loss_func``, when ``chunked_loss``
    resolves to off for the model, and under DDP/FSDP wrappers: the chunks call the decoder and
    the head directly, which would skip the wrapper's gradient synchronisation.
    """

    chunked_loss: bool | str = True
    loss_chunk_size: int = DEFAULT_CHUNK_SIZE

    def _chunked_for(self, model) -> bool:
        inner = self.accelerator.unwrap_model(model)
        if inner is not model or not use_chunked(self.chunked_loss, inner):
            return False
        check_chunk_size(self.loss_chunk_size)
        return True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        plain = (return_outputs or "labels" not in inputs or self.label_smoother is not None
                 or self.compute_loss_func is not None or not self._chunked_for(model))
        if plain:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        with self.accelerator.autocast():
            total, n = chunked_causal_lm_loss(model, inputs, chunk_size=self.loss_chunk_size,
                                              use_cache=False)
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            return total / num_items_in_batch
        return total / max(n, 1)
