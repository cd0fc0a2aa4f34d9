"""The "capitals" task for builtin:smollm2: held-out countries, the JSON reply format."""

from __future__ import annotations

import json

import pytest

import lora_lab as ll
from lora_lab.errors import DataError
from lora_lab.hf.data.chat_tasks import CAPITALS, TEMPLATES, follows_format


def _country(prompt: str) -> str:
    return next(c for c in CAPITALS if c in prompt and any(t.format(c=c) == prompt for t in TEMPLATES))


def test_train_and_test_name_disjoint_countries_and_answer_in_json():
    train, test = ll.builtin_task("capitals", n=396), ll.builtin_task("capitals", n=15, split="test")
    seen = {_country(p) for p in train["prompt"]}
    held_out = {_country(p) for p in test["prompt"]}
    assert len(held_out) == 15 and not seen & held_out and len(seen) + 15 == len(CAPITALS)
    assert len(set(train["prompt"])) == 396  # every (country, phrasing) pair once before repeats
    for prompt, response in zip(test["prompt"], test["response"]):
        assert json.loads(response) == {"capital": CAPITALS[_country(prompt)]}
        assert follows_format(response)


@pytest.mark.parametrize("text,ok", [('{"capital": "Paris"}', True), (' {"capital": "Lviv"}\n', True),
                                     ("The capital of France is Paris.", False),
                                     ('{"capital": 3}', False), ('["Paris"]', False), ('{"capital":', False)])
def test_follows_format(text, ok):
    assert follows_format(text) is ok


def test_unknown_task_lists_the_chat_task():
    with pytest.raises(DataError, match="capitals"):
        ll.builtin_task("capital")
