"""The switchboard's side by side takes None for the base model, as the rest of the API does with
``adapter=None`` (issue 16, bug 10); the column is labelled and keyed with the board's BASE label.
Oracles: greedy generation on the plain base model, and on a peft model carrying only the adapter."""

from __future__ import annotations

import pytest
import torch
from lora_testing import randomize_lora_b
from peft import PeftModel

import lora_lab as ll
from lora_lab.errors import AdapterError
from lora_lab.hf.generate.stream import generate
from lora_lab.ui.switchboard import BASE, AdapterSwitchboard

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "reverse abc"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    model, _ = ll.load_model("builtin:tiny", device="cpu")
    torch.manual_seed(7)
    pm = randomize_lora_b(ll.attach(model, ll.AdapterSpec(r=4, alpha=8), name="alpha"), 3, scale=0.3)
    return ll.save_adapter(pm, tmp_path_factory.mktemp("cmp") / "alpha")


def test_compare_accepts_none_for_the_base(folder):
    sb = AdapterSwitchboard(*ll.load_model("builtin:tiny", device="cpu"), redraw_every_s=0.0)
    sb.load(folder)
    assert sb.error == "" and sb.names() == ["alpha"]    # named after its folder
    sb.compare(PROMPT, names=["alpha", None])
    assert list(sb.comparison) == ["alpha", BASE] and list(sb.column_outputs) == ["alpha", BASE]
    assert f"<b>{BASE}</b>" in sb.columns.children[1].children[0].value
    plain, tok = ll.load_model("builtin:tiny", device="cpu")
    base = generate(plain, tok, PROMPT, max_new_tokens=12)
    alone = generate(PeftModel.from_pretrained(ll.load_model("builtin:tiny", device="cpu")[0],
                                               str(folder)), tok, PROMPT, max_new_tokens=12)
    assert sb.comparison[BASE].token_ids == base.token_ids
    assert sb.comparison["alpha"].token_ids == alone.token_ids != base.token_ids
    assert ll.active_adapter(sb.model) == "alpha"         # comparing leaves the active adapter
    sb.compare(PROMPT, names=[None, BASE])                # both mean the base: one column
    assert list(sb.comparison) == [BASE]
    with pytest.raises(AdapterError, match="unknown adapters"):
        sb.compare(PROMPT, names=[None, "nope"])
