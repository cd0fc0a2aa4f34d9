"""The response is closed the way the chat template closes a turn, not with eos.

Oracle (TRL's prompt-completion masking): the supervised tokens of a row are exactly the tokens of
``apply_chat_template(messages + [assistant turn])`` after those of
``apply_chat_template(messages, add_generation_prompt=True)``; and, for a template that marks the
assistant turn with ``{% generation %}``, exactly what ``return_assistant_tokens_mask`` marks.
"""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

import lora_lab as ll
from lora_lab.hf.data.prepare import IGNORE_INDEX, prepare_dataset
from lora_lab.hf.data.turns import end_of_turn_ids
from lora_lab.hf.model.builtin import TOKENIZER_DIR

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# The same, with the assistant turn marked for return_assistant_tokens_mask (as TRL asks for)
CHATML_GEN = ("{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|>assistant\n"
              "{% generation %}{{ m['content'] }}<|im_end|>\n{% endgeneration %}"
              "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
              "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
ROWS = [{"prompt": "reverse abc", "response": "cba"}, {"prompt": "upper ab", "response": "AB"},
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"},
                      {"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"}]}]
NO_EVAL = ll.DataSpec(eval_fraction=0)


def chatml_on_base(template=CHATML):
    """A base tokenizer (eos ``</s>``) given a ChatML template: end of turn ``<|im_end|>`` ≠ eos."""
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = template
    return tok


def _messages(row):
    if "messages" in row:
        return row["messages"][:-1], row["messages"][-1]["content"]
    return [{"role": "user", "content": row["prompt"]}], row["response"]


def _supervised(example) -> list[int]:
    return [t for t in example["labels"] if t != IGNORE_INDEX]


def _trl_completion(tok, row) -> list[int]:
    """What TRL supervises: the conversation's ids after the prompt's ids."""
    prompt, response = _messages(row)
    p = tok.apply_chat_template(prompt, add_generation_prompt=True)["input_ids"]
    full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": response}])["input_ids"]
    assert full[:len(p)] == p
    return full[len(p):]


def _prepared(tok, rows, spec=NO_EVAL):
    return [prepare_dataset([r], tok, spec).train[0] for r in rows]  # one row at a time: any columns


def test_chatml_on_base_supervises_what_the_template_writes():
    tok = chatml_on_base()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for row, ex in zip(ROWS, _prepared(tok, ROWS)):
        sup = _supervised(ex)
        assert sup == _trl_completion(tok, row)
        assert tok.decode(sup) == _messages(row)[1] + "<|im_end|>\n"
        assert im_end in sup and tok.eos_token_id not in sup  # closed as ChatML closes, not with </s>
        assert ex["input_ids"][-len(sup):] == sup


def test_assistant_tokens_mask_oracle():
    """return_assistant_tokens_mask (the {% generation %} block) marks the supervised tokens."""
    tok = chatml_on_base(CHATML_GEN)
    for row, ex in zip(ROWS, _prepared(tok, ROWS)):
        prompt, response = _messages(row)
        out = tok.apply_chat_template(prompt + [{"role": "assistant", "content": response}],
                                      return_dict=True, return_assistant_tokens_mask=True)
        marked = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
        if "messages" in row:  # earlier assistant turns are context, not targets
            marked = marked[-len(_supervised(ex)):]
        assert _supervised(ex) == marked
        assert ex["input_ids"] == out["input_ids"]


def test_builtin_template_still_ends_with_eos():
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)  # its template writes {{ eos_token }}
    for row, ex in zip(ROWS[:2], _prepared(tok, ROWS[:2])):
        assert _supervised(ex) == _trl_completion(tok, row)
        assert _supervised(ex)[-1] == tok.eos_token_id
    assert end_of_turn_ids(tok) == [tok.eos_token_id]


def test_no_chat_template_and_template_without_end_marker_close_with_eos():
    tok = chatml_on_base()
    ex = _prepared(tok, ROWS[:1], NO_EVAL.replace(use_chat_template=False))[0]
    assert _supervised(ex) == tok("cba", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert end_of_turn_ids(tok, NO_EVAL.replace(use_chat_template=False)) == [tok.eos_token_id]
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    ex = _prepared(tok, ROWS[:1])[0]  # the template writes "cba\n" and nothing that ends the turn
    assert _supervised(ex) == tok("cba\n", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert end_of_turn_ids(tok) == [tok.eos_token_id]


def test_end_of_turn_ids():
    tok = chatml_on_base()
    assert end_of_turn_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id]


def test_prompt_that_is_not_a_prefix_is_refused():
    tok = chatml_on_base("{% for m in messages %}{{ m['content'] }}|{% endfor %}"
                         "{% if add_generation_prompt %}>>{% endif %}")
    with pytest.raises(ll.DataError, match="prefix"):
        prepare_dataset(ROWS[:1], tok, NO_EVAL)


def test_smollm2_response_is_what_chatml_writes(smollm2_dir):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tok.eos_token == "<|im_end|>"  # SmolLM2-Instruct: eos is ChatML's end of turn
    rows = ll.builtin_task("capitals", n=3).to_list()
    for row, ex in zip(rows, _prepared(tok, rows)):
        assert _supervised(ex) == _trl_completion(tok, row)
        assert tok.decode(_supervised(ex)) == row["response"] + "<|im_end|>\n"
    assert end_of_turn_ids(tok) == [tok.eos_token_id]
