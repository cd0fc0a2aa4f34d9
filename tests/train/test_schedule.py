"""The learning-rate schedule is transformers' ``get_scheduler``, step for step (issue 23, item 10).

Oracle: a ``torch.optim`` optimizer driven by ``transformers.get_scheduler`` as the Trainer drives it
(``optimizer.step()`` at lr ``get_last_lr()``, then ``scheduler.step()``): the rate that update s
(0-based) uses.  Ours must equal it at every step, for each schedule, with and without warmup.  The
old warmup, (s + 1) / w, was the oracle's value at s + 1 (at w = 3: 1/3, 2/3, 1 against 0, 1/3, 2/3).
"""

from __future__ import annotations

import pytest
import torch
from transformers import get_scheduler

import lora_lab as ll
from lora_lab.train.loop import train
from lora_lab.train.optim import lr_factor

HF_NAME = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def _transformers_lrs(schedule: str, lr: float, warmup: int, steps: int) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = get_scheduler(HF_NAME[schedule], opt, num_warmup_steps=warmup, num_training_steps=steps)
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup", [0, 1, 3, 10, 12])
def test_lr_factor_equals_get_scheduler_at_every_step(schedule, warmup):
    steps, lr = 10, 3e-4
    spec = ll.TrainSpec(steps=steps, lr=lr, schedule=schedule, warmup_steps=warmup)
    ours = [lr * lr_factor(s, steps, spec) for s in range(steps)]
    assert ours == pytest.approx(_transformers_lrs(schedule, lr, warmup, steps), rel=1e-12, abs=0)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_the_loop_applies_and_logs_transformers_rates(tiny_llama_dir, tmp_path, schedule, one_thread):
    """End to end: the rate each step of ``train`` logs, and the rate its update used.  With SGD
    (no weight decay, no clipping) a step is w' = w - lr·g, so lr = ⟨w - w', g⟩ / ⟨g, g⟩."""
    model, tok = ll.load_model(tiny_llama_dir, device="cpu")
    model = ll.attach(model, ll.AdapterSpec(r=2, target_modules="attention-qv"))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads, applied = {}, []
    for n, p in params.items():
        p.register_post_accumulate_grad_hook(lambda p, n=n: grads.__setitem__(n, p.grad.clone()))
    prev = {n: p.detach().clone() for n, p in params.items()}

    class AppliedLr:
        def on_step(self, state, control):
            dw_g = sum(((prev[n] - p.detach()) * grads[n]).sum() for n, p in params.items())
            applied.append(float(dw_g / sum((g * g).sum() for g in grads.values())))
            prev.update({n: p.detach().clone() for n, p in params.items()})

    rows = [{"input_ids": [5, 6, 7, 8], "labels": [5, 6, 7, 8]}] * 2
    spec = ll.TrainSpec(steps=6, batch_size=2, lr=0.1, schedule=schedule, warmup_steps=2,
                        optimizer="sgd", max_grad_norm=None, output_dir=str(tmp_path / "r"))
    res = train(model, tok, rows, spec=spec, callbacks=[AppliedLr()])
    want = _transformers_lrs(schedule, 0.1, 2, 6)
    logged = res.history[res.history.event == "step"].lr.tolist()
    assert logged == pytest.approx(want, rel=1e-12)
    assert applied == pytest.approx(want, rel=1e-3, abs=1e-9)
    assert applied[0] == 0.0  # warmup starts at 0, as the Trainer's does: the first step moves nothing
