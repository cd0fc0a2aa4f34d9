"""LiveCallback: lora_lab callbacks and the dashboard under transformers.Trainer."""

from __future__ import annotations

import numpy as np
import torch

from lora_lab.hf.training.trainer_callback import LiveCallback
from lora_lab.train.events import Control, TrainState


def test_the_trainer_bridge_uses_the_loops_classes():
    import lora_lab.hf.training.trainer_callback as bridge

    assert bridge.TrainState is TrainState and LiveCallback().control.__class__ is Control


def test_live_callback_under_trainer(lora_tiny, rows, tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from lora_lab.ui.dashboard import TrainingDashboard

    model, tok = lora_tiny
    n = min(len(r["input_ids"]) for r in rows)  # equal lengths: the default collator stacks them
    ds = Dataset.from_list([{k: v[:n] for k, v in r.items()} for r in rows])
    events = []

    class Recorder:
        def __getattr__(self, name):
            if name.startswith("on_"):
                return lambda state, control: events.append((name[3:], state.step, state.loss))
            raise AttributeError(name)

    class StopAt3:
        def on_step(self, state, control):
            if state.step == 3:
                control.stop("enough")

    dash = TrainingDashboard()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4,
                             learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True,
                             save_strategy="no", eval_strategy="no", disable_tqdm=True,
                             include_num_input_tokens_seen=True)
    trainer = Trainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                      callbacks=[LiveCallback(Recorder(), dash, StopAt3())])
    out = trainer.train()
    assert out.global_step == 3  # the stop request reached the Trainer after step 3
    kinds = [e[0] for e in events]
    assert kinds[0] == "begin" and kinds[-1] == "end" and kinds.count("step") == 3
    steps = [e for e in events if e[0] == "step"]
    assert [s[1] for s in steps] == [1, 2, 3] and all(np.isfinite(s[2]) for s in steps)
    train_trace = dash.figure.data[0]
    np.testing.assert_array_equal(train_trace.x, [1, 2, 3])
    np.testing.assert_allclose(train_trace.y, [s[2] for s in steps])
    tps = dash.figure.data[5].y
    assert np.all(tps > 0)  # tokens/s from num_input_tokens_seen


def test_the_bridge_warns_when_the_trainer_would_run_emulated_bf16(lora_tiny, rows, tmp_path, monkeypatch):
    """On a CPU without native bf16 (the chip check made to say so), TrainingArguments(bf16=True)
    gets a warning with the fix at the start of the run; with the check saying native, none."""
    import warnings

    import pytest
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from lora_lab.hf.model import device as dev

    model, tok = lora_tiny
    n = min(len(r["input_ids"]) for r in rows)
    ds = Dataset.from_list([{k: v[:n] for k, v in r.items()} for r in rows])

    def run(native: bool, out: str):
        monkeypatch.setattr(dev, "cpu_bf16_native", lambda: native)
        monkeypatch.setattr(dev, "cpu_bf16_onednn", lambda: native)
        args = TrainingArguments(output_dir=str(tmp_path / out), max_steps=1, per_device_train_batch_size=4,
                                 report_to=[], use_cpu=True, bf16=True, save_strategy="no",
                                 eval_strategy="no", disable_tqdm=True)
        Trainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                callbacks=[LiveCallback()]).train()

    with pytest.warns(UserWarning, match=r"bf16=True\) on a CPU: this CPU has no native bf16") as seen:
        run(False, "emulated")
    assert any("Pass bf16=False" in str(w.message) for w in seen)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*native bf16.*")
        run(True, "native")
    # a base whose frozen layers are bf16: warned with the load fix (the callback's begin event alone)
    from transformers import TrainerControl, TrainerState

    monkeypatch.setattr(dev, "cpu_bf16_native", lambda: False)
    monkeypatch.setattr(dev, "cpu_bf16_onednn", lambda: False)
    frozen = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad]
    for m in frozen:
        m.weight.data = m.weight.data.bfloat16()
    args = TrainingArguments(output_dir=str(tmp_path / "base"), report_to=[], use_cpu=True)
    with pytest.warns(UserWarning, match=f"{len(frozen)} layers of this model multiply in bf16") as seen:
        LiveCallback().on_train_begin(args, TrainerState(), TrainerControl(), model=model)
    assert any("dtype='auto'" in str(w.message) for w in seen)
