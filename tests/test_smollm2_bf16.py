"""bf16 on the real model (issue 22): a bf16 base under bf16 autocast (what ``dtype="auto"`` and
``precision="auto"`` pick for SmolLM2-135M on a CPU with native bf16) trains like fp32.

A few steps of the notebook-07 reply-format task, fp32 against bf16, from the same adapter init on
the same rows: the losses agree step by step within bf16's rounding, the adapter stays fp32, and
the held-out loss after training (evaluated in fp32 for both) agrees too.  The fuller measurement,
with accuracies after training to convergence, is ``benchmarks/bf16_quality.py``.
"""

from __future__ import annotations

import pytest
import torch

import lora_lab as ll
from lora_lab.hf.adapters.merge import _fp32_forward
from lora_lab.hf.data.prepare import pad_batch
from lora_lab.hf.model import device as dev

# where the chip emulates bf16 (measured 30-350x slower than fp32) train() refuses bf16, and three
# emulated steps of the real model would take many minutes: the refusal is tests/train/test_cpu_bf16.py's
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not dev.cpu_bf16_native(), reason="this CPU has no native bf16")]
STEPS = 3


def _run(dtype, precision, data, tmp_path):
    model, tok = ll.load_model("builtin:smollm2", device="cpu", dtype=dtype)
    torch.manual_seed(0)
    model = ll.attach(model, ll.AdapterSpec(r=8, target_modules="all-linear"), name="json")
    spec = ll.TrainSpec(steps=STEPS, batch_size=4, lr=1e-3, schedule="constant", precision=precision,
                        output_dir=str(tmp_path / precision))
    return model, tok, ll.train(model, tok, data(tok), None, spec)


def test_bf16_base_and_autocast_train_smollm2_like_fp32(smollm2_dir, tmp_path):
    assert dev.auto_dtype("cpu", 576) == (torch.bfloat16 if dev.cpu_bf16_native() else torch.float32)
    rows = ll.builtin_task("capitals", n=STEPS * 4, seed=0)
    test = ll.builtin_task("capitals", n=15, split="test")

    def data(tok):
        return ll.prepare_dataset(rows, tok, ll.DataSpec(max_length=96, eval_fraction=0))

    m32, tok, r32 = _run("fp32", "fp32", data, tmp_path)
    m16, _, r16 = _run("bf16", "bf16", data, tmp_path)   # "auto" on a bf16 CPU; forced elsewhere
    assert m16.get_base_model().dtype == torch.bfloat16 and r16.final["precision"] == "bf16 autocast"
    assert all(p.dtype == torch.float32 for p in m16.parameters() if p.requires_grad)
    l32, l16 = r32.loss.to_numpy(), r16.loss.to_numpy()
    # step 1 sees the same adapter (B = 0): only bf16's rounding of the base weights and of the
    # activations differs (measured 2.611 vs 2.584, 1.1%).  After one AdamW step the bf16 run's
    # loss is higher (measured 1.97 vs 1.79 and 1.50 vs 1.37: 10%), part of it the bf16 forward
    # rounding the still small adapter output against the base's; benchmarks/bf16_quality.py
    # follows the gap to the end of a run
    assert abs(l16[0] - l32[0]) / l32[0] < 0.03, (l32, l16)
    assert (abs(l16 - l32) / l32).max() < 0.2, (l32, l16)
    assert l16[-1] < 0.75 * l16[0] and l32[-1] < 0.75 * l32[0]       # both learn (measured 0.58x)

    held = ll.prepare_dataset(test, tok, ll.DataSpec(max_length=96, eval_fraction=0)).train
    batch = pad_batch(list(held), tok.pad_token_id)
    losses = []
    for model in (m32, m16):
        model.eval()
        with torch.no_grad(), _fp32_forward(model):
            losses.append(float(model(**batch).loss))
    assert abs(losses[1] - losses[0]) / losses[0] < 0.15, losses
