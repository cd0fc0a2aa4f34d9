"""Keep the language-model head's input contiguous, so batched generation on a CPU in bf16/fp16 does
not copy the head's weight once per prompt.

What happens without it.  ``model.generate`` asks for the logits of the last position only
(``logits_to_keep=1``), so on the first step the head receives ``h[:, -1:, :]``: shape (B, 1, d), a
view of the (B, T, d) hidden states with strides (T·d, d, 1), which is not contiguous when B > 1 and
T > 1.  For such an input, ``torch.matmul`` (called by ``F.linear``) folds the batch into one
(B, d) @ (d, V) product only when the weight requires a gradient; a frozen weight — the base model
under every adapter, every quantized model — goes to ``bmm`` with the weight expanded to (B, d, V),
and PyTorch's CPU ``bmm`` copies that expanded weight for bf16 and fp16 (pytorch/pytorch#151934).
That is B·d·V·2 bytes to compute B·V numbers: 810 MB for 15 prompts on SmolLM2 (d = 576,
V = 49,152), more than the whole model, enough to push a 2 GB Binder kernel over its limit.

The fix costs one copy of the (B, 1, d) input (B·d·2 bytes) and gives the folded ``mm`` path, with the
same logits.  It is a forward pre-hook on the output embedding, installed once by
:func:`lora_lab.load_model`, :func:`lora_lab.attach` and the batched generators; it does nothing to an
input that is already contiguous (training, full-sequence logits, batch 1).
"""

from __future__ import annotations

from torch import nn

__all__ = ["keep_head_input_contiguous"]

_MARK = "_lora_lab_contiguous_input"


def _contiguous_input(module: nn.Module, args: tuple):
    if args and hasattr(args[0], "is_contiguous") and not args[0].is_contiguous():
        return (args[0].contiguous(),) + tuple(args[1:])
    return None


def keep_head_input_contiguous(model: nn.Module) -> nn.Module:
    """Install the pre-hook on ``model``'s output embedding (its LM head) once; return ``model``.

    Works on a plain transformers model and on a peft model (the head is the base model's).  A model
    without an output embedding is returned unchanged.
    """
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if isinstance(head, nn.Module) and not getattr(head, _MARK, False):
        head.register_forward_pre_hook(_contiguous_input)
        setattr(head, _MARK, True)
    return model
