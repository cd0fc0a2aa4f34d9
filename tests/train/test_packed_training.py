"""``ll.train`` on packed rows trains the objective of the same examples unpacked.

Oracle: the step-1 loss (computed before any update) of one step over all the examples is the mean
over the same supervised tokens whether the examples are packed or not, because every packed
example sees only itself (tests/hf/data/test_packing.py) and each one's first label is dropped
(it is never predicted unpacked either).  Prompt and prefix tuning cannot keep packed examples
apart (peft drops or shifts position ids), so they are refused.
"""

from __future__ import annotations

import pytest
import torch

import lora_lab as ll


def _train(model, tok, data, tmp_path, steps, batch_size):
    torch.manual_seed(0)
    spec = ll.TrainSpec(steps=steps, batch_size=batch_size, lr=3e-3, warmup_steps=0, seed=0,
                        precision="fp32", output_dir=str(tmp_path))  # exact fp32 oracle
    return ll.train(model, tok, data, spec=spec)


def test_one_step_over_all_rows_has_the_unpacked_loss(tmp_path, one_thread):
    rows = ll.builtin_task("copy", n=24, seed=1)
    spec = ll.DataSpec(eval_fraction=0, max_length=128)
    losses, tokens = {}, {}
    for packing in (False, True):
        model, tok = ll.load_model("builtin:tiny", device="cpu")
        torch.manual_seed(0)
        model = ll.attach(model, ll.AdapterSpec(r=4))
        data = ll.prepare_dataset(rows, tok, spec.replace(packing=packing))
        n = len(data.train)
        result = _train(model, tok, data, tmp_path / str(packing), steps=1, batch_size=n)
        losses[packing], tokens[packing] = result.history["loss"].iloc[-1], result.final["tokens"]
    assert n < 24  # the packed run really packed
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    assert tokens[True] == tokens[False]


def test_packed_training_learns(tmp_path, one_thread):
    model, tok = ll.load_model("builtin:tiny", device="cpu")
    model = ll.attach(model, ll.AdapterSpec(r=8, target_modules="all-linear"))
    data = ll.prepare_dataset(ll.builtin_task("reverse", n=64, seed=2), tok,
                              ll.DataSpec(eval_fraction=0, max_length=256, packing=True))
    loss = _train(model, tok, data, tmp_path, steps=20, batch_size=2).history["loss"]
    assert loss.iloc[-3:].mean() < 0.8 * loss.iloc[:3].mean()


def test_prompt_tuning_refuses_packed_rows(tmp_path):
    model, tok = ll.load_model("builtin:tiny", device="cpu")
    model = ll.attach(model, ll.AdapterSpec(method="prompt", num_virtual_tokens=4))
    data = ll.prepare_dataset(ll.builtin_task("copy", n=8), tok,
                              ll.DataSpec(eval_fraction=0, max_length=128, packing=True))
    with pytest.raises(ll.DataError, match="packing=False"):
        _train(model, tok, data, tmp_path, steps=1, batch_size=2)
