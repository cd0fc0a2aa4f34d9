"""prepare_dataset, format_prompt, encode_prompt and pad_batch on the builtin character tokenizer.

The builtin tokenizer maps one character to one token and adds no BOS, so every length below can be
counted by hand: a prompt p rendered with the default template "{prompt}\\n" is len(p) + 1 tokens,
and a response r followed by EOS is len(r) + 1 tokens.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
from collections import Counter

import pytest
import torch

from lora_lab import DataError, DataSpec
from lora_lab.hf.model.builtin import TOKENIZER_DIR
from lora_lab.hf.data.prepare import (IGNORE_INDEX, PreparedData, encode_prompt, format_prompt,
                                      pad_batch, prepare_dataset)

# A chat template in the usual shape: BOS written by the template, assistant turns end with EOS.
CHAT = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")

ROWS = [
    {"prompt": "reverse: abc", "response": "cba"},
    {"prompt": "add 2+2", "response": "4"},
    {"prompt": "Say \"hi\", please", "response": "hi, there\nbye"},
    {"prompt": "x", "response": ""},
    {"prompt": "copy: hello world", "response": "hello world"},
]
NO_EVAL = DataSpec(eval_fraction=0)


def _load_tok(chat_template=None):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    t.chat_template = chat_template
    return t


@pytest.fixture(scope="module")
def tok():
    """The builtin tokenizer without a chat template: the plain DataSpec.template path."""
    return _load_tok()


@pytest.fixture(scope="module")
def shipped_tok():
    """The builtin tokenizer as shipped (with whatever chat template the package gives it)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def chat_tok():
    return _load_tok(CHAT)


@pytest.fixture(scope="module")
def bos_tok():
    """The builtin tokenizer changed to add a BOS itself, as Llama's does."""
    from tokenizers.processors import TemplateProcessing

    t = _load_tok()
    t.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", t.bos_token_id)])
    assert t("a")["input_ids"] == [t.bos_token_id, t.convert_tokens_to_ids("a")]
    return t


def _supervised(row) -> list[int]:
    return [i for i, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE_INDEX]


def _n_prompt(row) -> int:
    return next(i for i, lab in enumerate(row["labels"]) if lab != IGNORE_INDEX)


def _tokens(data: PreparedData) -> list[tuple]:
    return [(tuple(r["input_ids"]), tuple(r["labels"])) for r in data.train]


def test_labels_are_response_plus_eos_and_prompt_is_masked(tok):
    data = prepare_dataset(ROWS, tok, NO_EVAL)
    assert data.train.column_names == ["input_ids", "attention_mask", "labels"]
    assert (data.n_rows, len(data.train), data.eval) == (5, 5, None)
    for src, row in zip(ROWS, data.train):
        n = _n_prompt(row)
        assert row["labels"][:n] == [IGNORE_INDEX] * n
        assert row["labels"][n:] == row["input_ids"][n:]
        assert tok.decode(_supervised(row)) == src["response"] + tok.eos_token
        assert tok.decode(row["input_ids"][:n]) == format_prompt(tok, src["prompt"]) \
            == src["prompt"] + "\n"
        assert row["input_ids"][:n] == encode_prompt(tok, src["prompt"])
        assert row["attention_mask"] == [1] * len(row["input_ids"])
        assert len(row["input_ids"]) == len(src["prompt"]) + 1 + len(src["response"]) + 1
    assert data.n_train_tokens == sum(len(p["prompt"]) + len(p["response"]) + 2 for p in ROWS)
    assert data.n_label_tokens == sum(len(p["response"]) + 1 for p in ROWS)
    assert "PreparedData(" in repr(data) and "<table>" in data._repr_html_()


def test_train_on_everything_labels_equal_inputs(tok):
    data = prepare_dataset(ROWS, tok, DataSpec(eval_fraction=0, train_on_responses_only=False))
    assert all(r["labels"] == r["input_ids"] for r in data.train)


def test_truncation_counts_match_a_hand_count(tok):
    rows = [{"prompt": "ab", "response": "cd"},          # 3 + 3 = 6 tokens: fits
            {"prompt": "abcd", "response": "efgh"},      # 5 + 5 = 10: fits exactly
            {"prompt": "abcdef", "response": "ghij"},    # 7 + 5 = 12: truncated
            {"prompt": "abcdefghi", "response": "x"},    # prompt alone is 10: dropped
            {"prompt": "abcdefgh", "response": "xy"},    # 9 + 3 = 12: truncated, "x" survives
            {"prompt": "abcdefg", "response": "xy"}]     # 8 + 3 = 11: truncated, EOS cut
    data = prepare_dataset(rows, tok, DataSpec(eval_fraction=0, max_length=10))
    assert (data.n_rows, data.n_truncated, data.n_dropped, len(data.train)) == (6, 3, 1, 5)
    assert [len(r["input_ids"]) for r in data.train] == [6, 10, 10, 10, 10]
    assert [tok.decode(_supervised(r)) for r in data.train] == ["cd</s>", "efgh</s>", "ghi", "x",
                                                                "xy"]


def test_every_row_truncated_away_names_max_length_and_longest_prompt(tok):
    rows = [{"prompt": "a" * 20, "response": "b"}, {"prompt": "a" * 30, "response": "b"}]
    with pytest.raises(DataError, match=r"max_length = 16.*longest prompt is 31 tokens"):
        prepare_dataset(rows, tok, DataSpec(eval_fraction=0, max_length=16))


def test_files_round_trip_to_the_same_tokens(tok, tmp_path):
    rows = ROWS + [{"prompt": "what is 6*7?", "response": "42"}]  # csv must keep "42" a string
    expected = _tokens(prepare_dataset(rows, tok, NO_EVAL))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "response"])
        w.writeheader()
        w.writerows(rows)
    for name in ("d.json", "d.jsonl", "d.csv"):
        assert _tokens(prepare_dataset(tmp_path / name, tok, NO_EVAL)) == expected, name
    assert _tokens(prepare_dataset(str(tmp_path / "d.csv"), tok, NO_EVAL)) == expected


def test_dataset_dataframe_column_dict_and_saved_folder_match_the_list(tok, tmp_path):
    import pandas as pd
    from datasets import Dataset

    expected = _tokens(prepare_dataset(ROWS, tok, NO_EVAL))
    columns = {k: [r[k] for r in ROWS] for k in ("prompt", "response")}
    Dataset.from_list(ROWS).save_to_disk(tmp_path / "saved")
    for src in (Dataset.from_list(ROWS), pd.DataFrame(ROWS), columns, tmp_path / "saved"):
        assert _tokens(prepare_dataset(src, tok, NO_EVAL)) == expected, type(src).__name__


@pytest.mark.parametrize("which", ["plain", "chat"])
def test_messages_rows_equal_prompt_response_rows(tok, chat_tok, which):
    t = tok if which == "plain" else chat_tok
    msgs = [{"messages": [{"role": "user", "content": r["prompt"]},
                          {"role": "assistant", "content": r["response"]}]} for r in ROWS]
    assert _tokens(prepare_dataset(msgs, t, NO_EVAL)) == _tokens(prepare_dataset(ROWS, t, NO_EVAL))


def test_chat_template_training_text_is_the_rendered_conversation(chat_tok, tok):
    convo = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
             {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"},
             {"role": "assistant", "content": "4"}]
    row = prepare_dataset([{"messages": convo}], chat_tok, NO_EVAL).train[0]
    n = _n_prompt(row)
    rendered = chat_tok.apply_chat_template(convo[:4], add_generation_prompt=True, tokenize=False)
    assert rendered.startswith("<s><|system|>") and rendered.endswith("<|user|>2+2?\n<|assistant|>")
    assert chat_tok.decode(row["input_ids"][:n]) == rendered == format_prompt(chat_tok, convo[:4])
    assert row["input_ids"][:n] == encode_prompt(chat_tok, convo[:4])
    assert row["input_ids"].count(chat_tok.bos_token_id) == 1  # the template's <s>, no second one
    assert chat_tok.decode(_supervised(row)) == "4</s>"
    # this template ends assistant turns with EOS, so training ids == the whole rendered chat
    assert row["input_ids"] == chat_tok.apply_chat_template(convo, tokenize=True,
                                                            return_dict=True)["input_ids"]
    # without a chat template, history becomes "role: content" lines in DataSpec.template
    assert format_prompt(tok, convo[:4]) == \
        "system: be brief\nuser: hi\nassistant: hello\nuser: 2+2?\n"
    # use_chat_template=False falls back to the plain template even with a chat template set
    plain = DataSpec(use_chat_template=False, template="Q: {prompt}\nA: ")
    assert format_prompt(chat_tok, "hi", plain) == "Q: hi\nA: "


def test_shipped_builtin_tokenizer_trains_on_response_plus_eos(shipped_tok):
    data = prepare_dataset(ROWS, shipped_tok, NO_EVAL)
    for src, row in zip(ROWS, data.train):
        n = _n_prompt(row)
        assert shipped_tok.decode(_supervised(row)) == src["response"] + shipped_tok.eos_token
        assert shipped_tok.decode(row["input_ids"][:n]) == format_prompt(shipped_tok, src["prompt"])
        assert row["input_ids"][:n] == encode_prompt(shipped_tok, src["prompt"])


def test_bos_is_added_once_as_the_tokenizer_would(bos_tok):
    bos = bos_tok.bos_token_id
    row = prepare_dataset(ROWS[:1], bos_tok, NO_EVAL).train[0]
    n = _n_prompt(row)
    assert row["input_ids"][:n] == bos_tok(format_prompt(bos_tok, ROWS[0]["prompt"]))["input_ids"]
    assert row["input_ids"][:2] == [bos, bos_tok.convert_tokens_to_ids("r")]
    spec = DataSpec(eval_fraction=0, template="<s>{prompt}\n")  # a template that writes <s> itself
    row = prepare_dataset(ROWS[:1], bos_tok, spec).train[0]
    assert row["input_ids"].count(bos) == 1
    assert row["input_ids"][:_n_prompt(row)] == encode_prompt(bos_tok, ROWS[0]["prompt"], spec)


def test_packing_keeps_every_supervised_token(tok):
    rows = [{"prompt": f"p{i}" * (i % 4 + 1), "response": "r" * (i % 5) + str(i)}
            for i in range(30)]
    spec = DataSpec(eval_fraction=0, max_length=64)
    plain = prepare_dataset(rows, tok, spec)
    packed = prepare_dataset(rows, tok, dataclasses.replace(spec, packing=True))
    assert packed.packing and len(packed.train) < len(plain.train)
    assert all(len(r["input_ids"]) <= 64 for r in packed.train)
    flat = lambda d, key: [t for r in d.train for t in r[key]]
    assert Counter(t for r in packed.train for t in _supervised(r)) == \
        Counter(t for r in plain.train for t in _supervised(r))
    assert flat(packed, "input_ids") == flat(plain, "input_ids")  # whole examples, in order
    assert flat(packed, "labels") == flat(plain, "labels")
    assert packed.n_label_tokens == plain.n_label_tokens
    assert packed.n_train_tokens == plain.n_train_tokens


def test_eval_split_is_seeded_and_disjoint(tok):
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(20)]
    a = prepare_dataset(rows, tok, DataSpec(eval_fraction=0.25, seed=0))
    b = prepare_dataset(rows, tok, DataSpec(eval_fraction=0.25, seed=0))
    c = prepare_dataset(rows, tok, DataSpec(eval_fraction=0.25, seed=1))
    answers = lambda ds: {tok.decode(_supervised(r)) for r in ds}
    assert (len(a.train), len(a.eval), a.n_rows) == (15, 5, 20)
    assert answers(a.train) | answers(a.eval) == {f"a{i}</s>" for i in range(20)}
    assert not answers(a.train) & answers(a.eval)
    assert answers(a.eval) == answers(b.eval) and answers(a.eval) != answers(c.eval)


def test_source_eval_split_is_used(tok):
    from datasets import Dataset, DatasetDict

    dd = DatasetDict(train=Dataset.from_list(ROWS), validation=Dataset.from_list(ROWS[:2]))
    data = prepare_dataset(dd, tok, DataSpec(eval_fraction=0.5))
    assert (len(data.train), len(data.eval), data.n_rows) == (5, 2, 7)
    assert prepare_dataset(dd, tok, NO_EVAL).eval is None


@pytest.mark.parametrize("rows, spec, pattern", [
    ([{"question": "a", "answer": "b"}], NO_EVAL,
     r"columns are \['question', 'answer'\](.|\n)*prompt_column='question'"),
    ([{"prompt": "a", "output": "b"}], NO_EVAL, r"'response' \(DataSpec.response_column\)"),
    ([{"prompt": "a", "response": "b"}], DataSpec(prompt_column="q", response_column="a",
                                                  eval_fraction=0), r"DataSpec.messages_column"),
    ([{"prompt": "a", "response": 4}], NO_EVAL, r"'response' = 4, a int, not a string"),
    ([{"prompt": None, "response": "b"}], NO_EVAL, r"'prompt' = None"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], NO_EVAL, r"no assistant message"),
    ([{"messages": "hi"}], NO_EVAL, r"'messages'.*not a list"),
    ([{"prompt": "a", "response": "b"}], DataSpec(template="{prompt} {x}", eval_fraction=0,
                                                  use_chat_template=False), r"DataSpec.template"),
    ([], NO_EVAL, r"empty"),
])
def test_bad_rows_raise_data_error(tok, rows, spec, pattern):
    with pytest.raises(DataError, match=pattern):
        prepare_dataset(rows, tok, spec)


def test_bad_sources_raise_data_error(tok, tmp_path):
    from datasets import Dataset, DatasetDict

    with pytest.raises(DataError, match="empty"):
        prepare_dataset(Dataset.from_dict({"prompt": [], "response": []}), tok)
    with pytest.raises(DataError, match="does not exist"):
        prepare_dataset(tmp_path / "missing.jsonl", tok)
    with pytest.raises(DataError, match="does not exist"):
        prepare_dataset("./missing.csv", tok)
    (tmp_path / "d.txt").write_text("prompt\tresponse\n")
    with pytest.raises(DataError, match=r"'\.txt'.*\.json, \.jsonl, \.csv"):
        prepare_dataset(tmp_path / "d.txt", tok)
    dd = DatasetDict(a=Dataset.from_list(ROWS), b=Dataset.from_list(ROWS))
    with pytest.raises(DataError, match=r"splits \['a', 'b'\] and none is 'train'"):
        prepare_dataset(dd, tok)
    (tmp_path / "empty.csv").write_text("prompt,response\n")
    with pytest.raises(DataError, match="empty"):
        prepare_dataset(tmp_path / "empty.csv", tok)


def test_unknown_hub_dataset_offline_says_to_pass_a_local_file(tok):
    import datasets

    assert datasets.config.HF_HUB_OFFLINE  # conftest sets HF_DATASETS_OFFLINE=1
    with pytest.raises(DataError, match=r"nobody/no-such-dataset(.|\n)*local \.json/\.jsonl/\.csv"):
        prepare_dataset("nobody/no-such-dataset", tok)


def test_pad_batch_pads_right_and_matches_unpadded_loss(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, pad_token_id=tok.pad_token_id)).eval()
    data = prepare_dataset(ROWS, tok, NO_EVAL)
    rows = [data.train[0], data.train[2], data.train[3]]
    batch = pad_batch(rows, tok.pad_token_id)
    T = max(len(r["input_ids"]) for r in rows)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in batch.items()} == \
        {k: (torch.long, (3, T)) for k in ("input_ids", "attention_mask", "labels")}
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        assert batch["input_ids"][i].tolist() == r["input_ids"] + [tok.pad_token_id] * (T - n)
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (T - n)
        assert batch["labels"][i].tolist() == r["labels"] + [IGNORE_INDEX] * (T - n)
    # padding changes no loss: the summed token loss of the batch equals the sum over single rows
    with torch.no_grad():
        def token_loss_sum(b):
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            return torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(), reduction="sum")
        single = sum(token_loss_sum(pad_batch([r], tok.pad_token_id)) for r in rows)
        torch.testing.assert_close(token_loss_sum(batch), single, rtol=1e-5, atol=1e-4)
    # the training loop's use: a DataLoader over the Dataset with pad_batch as collate function
    loader = torch.utils.data.DataLoader(data.train, batch_size=3, collate_fn=functools.partial(
        pad_batch, pad_token_id=tok.pad_token_id))
    first = next(iter(loader))
    expected = pad_batch([data.train[i] for i in range(3)], tok.pad_token_id)
    assert all(torch.equal(first[k], expected[k]) for k in expected)
    with pytest.raises(DataError, match="pad_token_id"):
        pad_batch(rows, None)
