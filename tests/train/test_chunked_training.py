"""``TrainSpec(chunked_loss=...)`` in ``lora_lab.train``: the chunked loss gives the loss history of
the full loss (fp32, 1e-5 relative), with and without gradient accumulation, on responses-only rows
of unequal lengths; ``"auto"`` follows the vocabulary; the result and the dashboard say which ran."""

from __future__ import annotations

import pytest
import torch

import lora_lab as ll
from lora_lab.errors import LoraLabError

RESPONSES = (1, 3, 12, 20, 5, 9)


def _rows(tok) -> list[dict]:
    from conftest import response_rows  # tests/train/conftest.py

    return response_rows(tok, RESPONSES)


def _run(tmp_path, name, chunked, **spec):
    model, tok = ll.load_model("builtin:tiny", device="cpu")
    torch.manual_seed(0)
    model = ll.attach(model, ll.AdapterSpec(r=4, target_modules="all-linear"))
    rows = _rows(tok)
    # fp32: "auto" is bf16 autocast on CPUs with native bf16, where the two losses round apart
    spec = ll.TrainSpec(steps=4, lr=1e-2, seed=0, output_dir=str(tmp_path / name), eval_every=2,
                        chunked_loss=chunked, loss_chunk_size=7, precision="fp32", **spec)
    return ll.train(model, tok, rows, eval_data=rows[:3], spec=spec)


@pytest.mark.parametrize("shape", [dict(batch_size=6), dict(batch_size=2, grad_accum=3)])
def test_same_loss_history_as_the_full_loss(tmp_path, one_thread, shape):
    full = _run(tmp_path, "full", False, **shape)
    chunked = _run(tmp_path, "chunked", True, **shape)
    a, b = full.history, chunked.history
    # the gradient norm sums over every parameter's float rounding: measured up to 1.6e-5 relative
    # with batches padded to a multiple of 8 (a dropped or doubled chunk moves it by percents)
    for col, rel in (("loss", 1e-5), ("eval_loss", 1e-5), ("grad_norm", 5e-5)):
        x, y = a[col].dropna().to_numpy(float), b[col].dropna().to_numpy(float)
        assert len(x) == len(y) > 0
        assert abs(x - y).max() <= rel * abs(x).max(), (col, x, y)
    assert full.final["loss_kind"] == "full"
    assert chunked.final["loss_kind"] == "chunked (7 tokens)"


def test_auto_is_off_for_a_small_vocabulary_and_the_state_says_so(tmp_path, one_thread):
    seen = []


    from lora_lab.train.events import Callback

    class Record(Callback):
        def on_step(self, state, control):
            seen.append(state.loss_kind)

    model, tok = ll.load_model("builtin:tiny", device="cpu")
    assert model.config.vocab_size < 32_000
    model = ll.attach(model, ll.AdapterSpec(r=4))
    result = ll.train(model, tok, _rows(tok), spec=ll.TrainSpec(steps=1, batch_size=2, chunked_loss="auto",
                      output_dir=str(tmp_path / "a")), callbacks=[Record()])
    assert result.final["loss_kind"] == "full" and seen == ["full"]


def test_chunked_true_on_prompt_tuning_is_refused(tmp_path, one_thread):
    model, tok = ll.load_model("builtin:tiny", device="cpu")
    model = ll.attach(model, ll.AdapterSpec(method="prompt", num_virtual_tokens=4))
    with pytest.raises(LoraLabError, match="virtual tokens"):
        ll.train(model, tok, _rows(tok), spec=ll.TrainSpec(steps=1, chunked_loss=True,
                                                           output_dir=str(tmp_path / "p")))


def test_dashboard_status_names_the_loss():
    from lora_lab.control import TrainState
    from lora_lab.ui.dashboard import TrainingDashboard

    dash = TrainingDashboard()
    dash._status(TrainState(event="step", step=1, max_steps=2, loss=1.0,
                            loss_kind="chunked (512 tokens)"), "running")
    assert "chunked (512 tokens) loss" in dash.status.value
