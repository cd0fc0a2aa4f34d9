"""The comm pump (lora_lab.ui.kernel): a no-op outside a kernel, and in a real kernel a front end's
click reaches a busy cell.

The last test runs a real kernel (jupyter_client, no browser): a cell trains with the dashboard,
the client clicks Stop over the shell channel while the cell is busy, exactly as a front end does,
and the cells queued behind it ("Run All") must run only after the training cell, in order.
"""

from __future__ import annotations

import textwrap
import time

import pytest

from lora_lab.ui.kernel import current_kernel, in_kernel, pump_kernel_events


def test_outside_a_kernel_there_is_no_kernel():
    assert current_kernel() is None and not in_kernel()


def test_pump_is_a_no_op_outside_a_kernel():
    assert pump_kernel_events() == 0


KERNEL_CELL = """
import os
os.environ["HF_HUB_OFFLINE"] = "1"
import torch, lora_lab as ll
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from lora_lab.hf.model.builtin import TOKENIZER_DIR
from lora_lab.hf.adapters.attach import attach
from lora_lab.train.loop import train
from lora_lab.ui.dashboard import TrainingDashboard
tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2, pad_token_id=tok.pad_token_id)
model = attach(LlamaForCausalLM(cfg), ll.AdapterSpec(r=2))
ids = tok("abcabcabcabc")["input_ids"]
rows = [{"input_ids": ids, "labels": ids}] * 4
dash = TrainingDashboard()
display(dash)
class Announce:
    def on_step(self, state, control):
        if state.step == 3:
            print("STOP_ID", dash.stop_button.model_id, flush=True)
res = train(model, tok, rows, spec=ll.TrainSpec(steps=3000, batch_size=4, output_dir=OUT),
            callbacks=[Announce(), dash])
print("RESULT", res.stop_reason, res.steps, flush=True)
"""


@pytest.mark.slow
def test_stop_button_in_a_real_busy_kernel(tmp_path):
    """A front end's click (a comm_msg on the shell channel) stops a cell that is busy training,
    and a cell queued behind it runs afterwards, in order."""
    jc = pytest.importorskip("jupyter_client.manager")
    km, kc = jc.start_new_kernel(kernel_name="python3", startup_timeout=120)
    try:
        first = kc.execute(f"OUT = {str(tmp_path / 'run')!r}\n" + textwrap.dedent(KERNEL_CELL))
        # two more cells queued behind it, as by Run All; the third reads a ContextVar the second
        # sets, which holds only if the deferred cells run in the kernel's persistent context
        second = kc.execute("import contextvars\nCV = contextvars.ContextVar('cv')\n"
                            "CV.set('second')\nprint('SECOND', flush=True)")
        third = kc.execute("print('THIRD', CV.get('lost'), flush=True)")
        cells = {first, second, third}
        out, clicked, idle, deadline = [], False, set(), time.time() + 240
        click_id, click_idle = None, False
        while idle != cells and time.time() < deadline:
            msg = kc.get_iopub_msg(timeout=deadline - time.time())
            parent = msg["parent_header"].get("msg_id")
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                out.append(content["text"])
                if content["text"].startswith("STOP_ID") and not clicked:
                    comm_id = content["text"].split()[1]
                    click = kc.session.msg("comm_msg", {
                        "comm_id": comm_id, "data": {"method": "custom",
                                                     "content": {"event": "click"}}})
                    kc.shell_channel.send(click)
                    click_id, clicked = click["header"]["msg_id"], True
            elif kind == "error":
                out.append("ERROR " + content["ename"] + ": " + content["evalue"])
            elif kind == "status" and content["execution_state"] == "idle" and parent in cells:
                idle.add(parent)
            elif kind == "status" and content["execution_state"] == "idle" and parent == click_id:
                click_idle = True
        text = "".join(out)
        assert clicked, text
        # ipywidgets' front end sends a widget's next message only after this one's "idle":
        # without it a second click (Resume after Pause) would never reach the busy kernel
        assert click_idle, "no idle status for the click handled during the busy cell"
        result = [line for line in text.splitlines() if line.startswith("RESULT")]
        assert result and result[0].startswith("RESULT stopped: Stop button"), text
        assert 3 <= int(result[0].split()[-1]) < 3000
        assert text.index("RESULT") < text.index("SECOND") < text.index("THIRD second"), text
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
