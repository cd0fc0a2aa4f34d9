"""The chunked language-model loss as written into an exported ``train.py``.

The script must run where lora_lab is not installed, so the loss of
:mod:`lora_lab.hf.training.chunked_loss` is embedded as source text; ``@MIN_VOCAB@`` and
``@BLOCK_BYTES@`` are replaced by :data:`lora_lab.core.logits.CHUNKED_LOSS_MIN_VOCAB` and
:data:`~lora_lab.core.logits.LOSS_BLOCK_BYTES` when the script is written
(``tests/export/test_script_loss.py`` holds the two to the same results).
"""

LOSS = '''

# ----------------------------------------------------------------------------- the chunked loss
# TRAIN["chunked_loss"]: the LM head and the cross-entropy run over chunks of
# TRAIN["loss_chunk_size"] tokens (a frozen head's gradient taken chunk by chunk in the forward), so
# a step holds one chunk's (C, V) logits instead of all B x T x V of them: 12.6 GB -> 0.8 GB for
# 4 x 2048 tokens of a 128k vocabulary (0.15 GB with a frozen head).  Same loss and gradients as
# the model's own loss (lora_lab.hf.training.chunked_loss, line for line).  "auto": on for
# vocabularies of CHUNKED_LOSS_MIN_VOCAB tokens or more.
CHUNKED_LOSS_MIN_VOCAB = @MIN_VOCAB@
LOSS_BLOCK_BYTES = @BLOCK_BYTES@  # fp32 bytes of a frozen head's logits turned into their gradient at a time
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def chunked_unsupported(model):
    """Why the chunked loss cannot run on this model (a sentence), or None when it can."""
    if getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
        return "prompt/prefix tuning adds virtual tokens in peft's forward, which it bypasses"
    lm = model.get_base_model() if isinstance(model, peft.PeftModel) else model
    for name in LOGIT_TRANSFORMS:
        if getattr(lm.config, name, None) not in (None, 1, 1.0):
            return f"{type(lm).__name__} transforms its logits after the LM head ({name})"
    if lm.get_output_embeddings() is None or lm.get_decoder() is lm:
        return f"{type(lm).__name__} does not expose its output layer and decoder"
    return None


def chunk_loss(head, hidden, targets):
    """Sum of the cross-entropy over one chunk: hidden (C, H), targets (C,); the logits die here."""
    logits = head(hidden).float()
    return torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX,
                                             reduction="sum")


def chunk_loss_and_grad(head, hidden, targets):
    """(sum of the CE, its gradient to hidden) of one chunk through a frozen head: z = head(h)
    (C, V), loss_t = logsumexp(z_t) - z_t[y_t], dloss_t/dz_t = softmax(z_t) - onehot(y_t) (0 where
    y_t = -100), written over the head's output in place one fp32 block of LOSS_BLOCK_BYTES at a
    time (it stays in a CPU's cache; a Linear's backward never reads its output), then taken
    through the head by autograd."""
    with torch.enable_grad():
        h = hidden.detach().requires_grad_()
        out = head(h)
    logits = out.detach()
    valid = targets != IGNORE_INDEX
    safe = torch.where(valid, targets, 0)[:, None]
    weight = valid[:, None].to(torch.float32)
    part = torch.zeros((), dtype=torch.float32, device=logits.device)
    rows = min(max(1, LOSS_BLOCK_BYTES // (4 * logits.shape[1])), logits.shape[0])
    fp32 = logits.dtype == torch.float32
    buffer = None if fp32 else torch.empty(rows, logits.shape[1], dtype=torch.float32, device=logits.device)
    for start in range(0, logits.shape[0], rows):
        block = logits[start:start + rows]
        z = block if fp32 else buffer[:block.shape[0]].copy_(block)
        y, w = safe[start:start + rows], weight[start:start + rows]
        z_y = z.gather(1, y)
        m = z.amax(dim=-1, keepdim=True)
        total = z.sub_(m).exp_().sum(dim=-1, keepdim=True)  # in place: torch.logsumexp allocates twice
        part += torch.where(w > 0, total.log() + m - z_y, 0).sum()
        z.mul_(w / total).masked_fill_(w == 0, 0).scatter_add_(1, y, -w)
        if not fp32:
            block.copy_(z)
    (g,) = torch.autograd.grad(out, h, grad_outputs=logits)
    return part, g


class FrozenHeadLoss(torch.autograd.Function):
    """Sum of the chunks' losses; a frozen head's gradient to the hidden states (N, H) is taken
    chunk by chunk in the forward and only scaled in the backward: the same two head matmuls per
    token as the full loss, one chunk of logits alive."""

    @staticmethod
    def forward(ctx, hidden, targets, head, chunk_size):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.zeros_like(hidden)
        for start in range(0, targets.numel(), chunk_size):
            y = targets[start:start + chunk_size]
            if not bool((y != IGNORE_INDEX).any()):
                continue  # nothing supervised here: no loss, no gradient
            part, g = chunk_loss_and_grad(head, hidden[start:start + chunk_size], y)
            grad[start:start + chunk_size] = g
            total += part
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None


def chunked_causal_lm_loss(model, batch, chunk_size):
    """(sum of the per-token losses, n supervised tokens) of a causal-LM batch: the decoder runs
    once, then the head and the loss run over chunks of the N = B x (T-1) positions that have a
    next token (labels shifted by one, -100 ignored, fp32 upcast: transformers' loss).  A trainable
    head (lm_head adapted) runs each chunk under activation checkpointing instead."""
    from torch.utils.checkpoint import checkpoint

    lm = model.get_base_model() if isinstance(model, peft.PeftModel) else model
    decoder, head = lm.get_decoder(), lm.get_output_embeddings()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = decoder(**inputs, use_cache=False).last_hidden_state          # (B, T, H)
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])                  # (N, H)
    targets = batch["labels"][:, 1:].reshape(-1).to(hidden.device)         # (N,)
    n = int((targets != IGNORE_INDEX).sum())
    grad = torch.is_grad_enabled()
    if grad and hidden.requires_grad and not any(p.requires_grad for p in head.parameters()):
        return FrozenHeadLoss.apply(hidden, targets, head, chunk_size), n
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_size):
        h, y = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        if not bool((y != IGNORE_INDEX).any()):
            continue
        if grad:
            total = total + checkpoint(chunk_loss, head, h, y, use_reentrant=False)
        else:
            total = total + chunk_loss(head, h, y)
    return total, n


class ChunkedLoss:
    """Put before Trainer: its compute_loss runs chunked_causal_lm_loss when TRAIN["chunked_loss"]
    says so, and returns what Trainer.compute_loss would: sum / num_items_in_batch (the supervised
    tokens of the whole accumulated step; the Trainer counts it as scaled for accumulation), else
    the micro-batch mean.  The full loss stays for evaluation (the Trainer wants the logits) and
    under DDP/FSDP (the chunks call the decoder and the head directly, past the wrapper that
    synchronises the gradients)."""

    def use_chunked_loss(self, model) -> bool:
        if not hasattr(self, "_chunked"):
            inner = self.accelerator.unwrap_model(model)      # the model inside DDP/FSDP
            setting, why = TRAIN["chunked_loss"], chunked_unsupported(inner)
            if setting is True and why:
                raise SystemExit(f"The chunked loss cannot run: {why}.  "
                                 "Set TRAIN['chunked_loss'] = False.")
            if setting == "auto":
                lm = inner.get_base_model() if isinstance(inner, peft.PeftModel) else inner
                vocab = lm.get_output_embeddings().weight.shape[0]
                setting = vocab >= CHUNKED_LOSS_MIN_VOCAB and why is None
            self._chunked = bool(setting) and inner is model
            if int(os.environ.get("RANK", 0)) == 0:
                say(f"loss: chunked, {TRAIN['loss_chunk_size']} tokens of logits at a time"
                    if self._chunked else "loss: full-vocabulary"
                    + (" (the chunked loss does not run under DDP/FSDP)" if setting else ""))
        return self._chunked

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or self.label_smoother is not None or not self.use_chunked_loss(model):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        with self.accelerator.autocast():
            total, n = chunked_causal_lm_loss(model, inputs, TRAIN["loss_chunk_size"])
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            return total / num_items_in_batch
        return total / max(n, 1)
'''
