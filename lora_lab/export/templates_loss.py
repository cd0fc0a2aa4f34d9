"""The chunked language-model loss as written into an exported ``train.py``.

The script must run where lora_lab is not installed, so the loss of
:mod:`lora_lab.hf.training.chunked_loss` is embedded as source text; ``@MIN_VOCAB@`` is replaced by
:data:`~lora_lab.hf.training.chunked_loss.CHUNKED_LOSS_MIN_VOCAB` when the script is written.
"""

LOSS = '''

# ----------------------------------------------------------------------------- the chunked loss
# TRAIN["chunked_loss"]: the LM head and the cross-entropy run over chunks of
# TRAIN["loss_chunk_size"] tokens (a frozen head's gradient taken chunk by chunk in the forward), so
# a step holds one chunk's (C, V) fp32 logits instead of all B x T x V of them: 12.6 GB -> 0.8 GB
# for 4 x 2048 tokens of a 128k vocabulary.  Same loss and gradients as the model's own loss
# (lora_lab.hf.training.chunked_loss, line for line).  "auto": on for vocabularies of
# CHUNKED_LOSS_MIN_VOCAB tokens or more.
CHUNKED_LOSS_MIN_VOCAB = @MIN_VOCAB@
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
    """(sum of the CE, its gradient to hidden) of one chunk through a frozen head: z = head(h) in
    fp32 (C, V), loss_t = logsumexp(z_t) - z_t[y_t], dloss_t/dz_t = softmax(z_t) - onehot(y_t)
    (0 where y_t = -100) written over z in place, then taken through the head by autograd."""
    with torch.enable_grad():
        h = hidden.detach().requires_grad_()
        out = head(h)
    z = out.detach().float()  # fp32 shares out's storage: a Linear's backward never reads its output
    valid = targets != IGNORE_INDEX
    safe = torch.where(valid, targets, 0)[:, None]
    z_y = z.gather(1, safe).squeeze(1)
    m = z.amax(dim=-1, keepdim=True)
    total = z.sub_(m).exp_().sum(dim=-1, keepdim=True)  # in place: torch.logsumexp allocates twice
    lse = total.log().add_(m).squeeze(1)
    part = ((lse - z_y) * valid).sum()
    z.mul_(valid[:, None] / total)
    z.scatter_add_(1, safe, -valid[:, None].to(z.dtype))
    (g,) = torch.autograd.grad(out, h, grad_outputs=z.to(out.dtype))
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
