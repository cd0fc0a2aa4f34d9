"""ChunkedLossMixin: transformers.Trainer (with LiveCallback) trains on the chunked loss exactly as it
trains on its own loss.

Oracle: the same Trainer without the mixin (transformers' ``compute_loss``: the model's
``ForCausalLMLoss`` over ``num_items_in_batch``).  fp32: loss, gradients and the weights after two
optimizer steps with gradient accumulation within 1e-5 relative.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainingArguments

import lora_lab as ll
from lora_lab.errors import LoraLabError
from lora_lab.hf.training.chunked_loss import ChunkedLossMixin

B, T, VOCAB = 4, 16, 300


class ChunkedTrainer(ChunkedLossMixin, Trainer):
    loss_chunk_size = 7  # does not divide B·(T-1) = 60: the last chunk is shorter


def _base():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, pad_token_id=0, use_cache=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def _model():
    model = ll.attach(_base(), ll.AdapterSpec(r=4, target_modules="all-linear"))
    with torch.no_grad():  # B = 0 at init: make every LoRA gradient non-trivial
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    return model


def _rows(n=8):
    g = torch.Generator().manual_seed(3)
    rows = []
    for i in range(n):
        ids = torch.randint(1, VOCAB, (T,), generator=g)
        labels = ids.clone()
        labels[: 3 + i % 5] = -100                      # prompts of different lengths
        rows.append({"input_ids": ids, "attention_mask": torch.ones(T, dtype=torch.long),
                     "labels": labels})
    return rows


def _collate(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def _trainer(cls, model, tmp_path, callbacks=(), **kw):
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, max_steps=2, learning_rate=1e-2,
                             use_cpu=True, report_to="none", save_strategy="no", logging_steps=1,
                             disable_tqdm=True, remove_unused_columns=False, seed=0,
                             lr_scheduler_type="constant", **kw)
    return cls(model=model, args=args, train_dataset=_rows(), data_collator=_collate,
               callbacks=list(callbacks))


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def test_compute_loss_and_gradients_are_the_trainers(tmp_path):
    model = _model()
    batch = _collate(_rows(B))
    n_items = torch.tensor(int((batch["labels"][:, 1:] != -100).sum()) + 5)  # as if accumulated
    results = []
    for cls in (Trainer, ChunkedTrainer):
        trainer = _trainer(cls, model, tmp_path)
        model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=n_items)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                         if p.requires_grad}))
    (full, g_full), (chunked, g_chunked) = results
    assert _rel(chunked, full) < 1e-5
    assert g_full.keys() == g_chunked.keys() and len(g_full) > 0
    assert max(_rel(g_chunked[k], g_full[k]) for k in g_full) < 1e-5


def test_training_with_accumulation_and_live_callback_matches_the_trainer(tmp_path):
    class Record:
        def __init__(self):
            self.losses = []

        def on_step(self, state, control):
            self.losses.append(state.loss)

    weights, logged = [], []
    for cls in (Trainer, ChunkedTrainer):
        model, rec = _model(), Record()
        trainer = _trainer(cls, model, tmp_path / cls.__name__, callbacks=[ll.LiveCallback(rec)])
        trainer.train()
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()
                                  if p.requires_grad]))
        logged.append(rec.losses)
    assert len(logged[0]) == len(logged[1]) == 2
    assert logged[1] == pytest.approx(logged[0], rel=1e-5)
    assert _rel(weights[1], weights[0]) < 1e-5
    assert _rel(weights[0], torch.cat([p.detach().flatten() for p in _model().parameters()
                                       if p.requires_grad])) > 1e-3  # it did train


def test_auto_and_off_keep_the_full_loss_and_bad_settings_refuse(tmp_path):
    class Auto(ChunkedTrainer):
        chunked_loss = "auto"               # a 300-token vocabulary is below AUTO_MIN_VOCAB

    model = _model()
    assert not _trainer(Auto, model, tmp_path)._chunked_for(model)
    assert _trainer(ChunkedTrainer, model, tmp_path)._chunked_for(model)

    class Bad(ChunkedTrainer):
        loss_chunk_size = 0

    with pytest.raises(LoraLabError, match="Fix: pass loss_chunk_size=512"):
        _trainer(Bad, model, tmp_path).compute_loss(model, _collate(_rows(2)))

    class Prompt(ChunkedTrainer):
        pass

    prompt = ll.attach(_base(), ll.AdapterSpec(method="prompt", num_virtual_tokens=4))
    with pytest.raises(LoraLabError, match="virtual tokens") as info:
        _trainer(Prompt, prompt, tmp_path).compute_loss(prompt, _collate(_rows(2)))
    assert "chunked_loss=False" in str(info.value)
