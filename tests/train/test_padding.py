"""TrainSpec.pad_to_multiple_of: batches padded to a multiple of 8 train exactly as batches padded
to their longest row (padding carries no loss and no real token attends to it), with fewer shapes.

Oracle: the same run with ``pad_to_multiple_of=None`` (transformers' own loss on the unrounded
batch) gives the same per-step losses and the same trained adapter; the shapes the model saw are
read from a forward pre-hook."""

from __future__ import annotations

import pytest
import torch

import lora_lab as ll
from lora_lab.errors import DataError, SpecError
from lora_lab.hf.data.prepare import IGNORE_INDEX, pad_batch, padded_length
from lora_lab.train.loop import train


def _rows(lengths):
    return [{"input_ids": list(range(1, n + 1)), "labels": list(range(1, n + 1))} for n in lengths]


def test_pad_batch_rounds_up_with_padding_and_never_past_max_length():
    batch = pad_batch(_rows([5, 11]), 0, multiple_of=8)
    assert batch["input_ids"].shape == (2, 16)
    assert batch["input_ids"][1].tolist() == list(range(1, 12)) + [0] * 5
    assert batch["attention_mask"][1].tolist() == [1] * 11 + [0] * 5
    assert batch["labels"][1].tolist() == list(range(1, 12)) + [IGNORE_INDEX] * 5
    assert pad_batch(_rows([5, 11]), 0)["input_ids"].shape == (2, 11)
    assert pad_batch(_rows([5, 11]), 0, multiple_of=8, max_length=13)["input_ids"].shape == (2, 13)
    assert pad_batch(_rows([5, 16]), 0, multiple_of=8)["input_ids"].shape == (2, 16)
    # a row already past max_length is not cut: rounding only stops there
    assert padded_length(37, 8, 30) == 37 and padded_length(37, 8) == 40 and padded_length(37, None) == 37
    packed = pad_batch([{"input_ids": [1, 2, 3, 4, 5], "position_ids": [0, 1, 2, 0, 1]}], 0, multiple_of=4)
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 0, 0]]
    assert packed["labels"][0, 5:].tolist() == [IGNORE_INDEX] * 3
    for bad in (0, -8, 2.5, True, "8"):
        with pytest.raises(DataError, match="multiple_of"):
            pad_batch(_rows([3]), 0, multiple_of=bad)


@pytest.mark.parametrize("bad", [0, -1, 8.0, "8"])
def test_train_spec_refuses_a_bad_multiple(bad):
    with pytest.raises(SpecError, match="pad_to_multiple_of"):
        ll.TrainSpec(pad_to_multiple_of=bad)


def _response_rows(tok):
    from conftest import response_rows  # tests/train/conftest.py

    return response_rows(tok, [3, 9, 14, 5, 21, 2, 11, 7, 17, 4, 13, 6, 10, 19, 1])


def _run(fresh_lora, rows, tmp_path, multiple, max_positions=None):
    model, tok = fresh_lora()
    if max_positions:
        model.config.max_position_embeddings = max_positions
    lengths = []
    def record(module, args, kwargs):
        lengths.append((kwargs["input_ids"] if "input_ids" in kwargs else args[0]).shape[1])

    hook = model.get_base_model().model.register_forward_pre_hook(record, with_kwargs=True)
    spec = ll.TrainSpec(steps=6, batch_size=3, lr=5e-3, schedule="constant", precision="fp32", eval_every=3,
                        pad_to_multiple_of=multiple, output_dir=str(tmp_path / f"run{multiple}"))
    result = train(model, tok, rows[:12], eval_data=rows[12:], spec=spec)
    hook.remove()
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return result, trained, lengths


def test_training_padded_to_a_multiple_equals_training_padded_to_the_longest(fresh_lora, tiny_llama,
                                                                             tmp_path):
    tok = tiny_llama[1]
    rows = _response_rows(tok)
    plain, w_plain, t_plain = _run(fresh_lora, rows, tmp_path, None)
    eight, w_eight, t_eight = _run(fresh_lora, rows, tmp_path, 8)
    assert any(t % 8 for t in t_plain), "the rows must give unrounded lengths, or the test proves nothing"
    assert all(t % 8 == 0 for t in t_eight) and len(set(t_eight)) < len(set(t_plain))
    assert [r["event"] for r in plain.rows] == [r["event"] for r in eight.rows]
    for key in ("loss", "eval_loss", "tokens", "grad_norm"):
        a = [r.get(key) for r in plain.rows if r.get(key) is not None]
        b = [r.get(key) for r in eight.rows if r.get(key) is not None]
        assert len(a) >= 2 and a == pytest.approx(b, rel=1e-5, abs=1e-6), key
    for name in w_plain:
        torch.testing.assert_close(w_eight[name], w_plain[name], rtol=1e-4, atol=1e-6)


def test_rounding_stops_at_the_model_s_positions(fresh_lora, tiny_llama, tmp_path):
    tok = tiny_llama[1]
    rows = _response_rows(tok)
    longest = max(len(r["input_ids"]) for r in rows)
    _, _, seen = _run(fresh_lora, rows, tmp_path, 64, max_positions=longest + 1)
    assert max(seen) == longest + 1 and all(t <= longest + 1 for t in seen)
