"""The exported train.py prepares data exactly as lora_lab does: the same rows from ``tokenize``
(end of turn, packing), the same batch from ``PadCollator``, the same token count, and, through its
Trainer, the same loss (oracle: a packed batch's loss is the unpacked batch's loss)."""

from __future__ import annotations

import importlib.util
from dataclasses import asdict

import pytest
import torch
from transformers import AutoTokenizer

import lora_lab as ll
from lora_lab.export.script import export_script
from lora_lab.hf.data.prepare import IGNORE_INDEX, pad_batch, prepare_dataset
from lora_lab.hf.model.builtin import TOKENIZER_DIR
from lora_lab.train.data import batch_tokens

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# a template that writes no special token after the answer: lora_lab then closes it with eos
PLAIN = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
         "{% if add_generation_prompt %}assistant: {% endif %}")

PAIRS = [{"prompt": f"next {i}", "response": str(i + 1)} for i in range(14)]
PAIRS += [{"prompt": "reverse " + "abcdefgh" * 2, "response": "hgfedcba" * 2}]
CHATS = [{"messages": [{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": f"{i}+1"}, {"role": "assistant", "content": str(i)},
                       {"role": "user", "content": f"{i}+2"},
                       {"role": "assistant", "content": f"{i + 2} is the sum"}]} for i in range(9)]
SPECS = {
    "default": ll.DataSpec(),
    "packed": ll.DataSpec(packing=True, max_length=170),
    "packed-all-labels": ll.DataSpec(packing=True, max_length=170, train_on_responses_only=False),
    "no-chat-template": ll.DataSpec(use_chat_template=False, packing=True, max_length=170),
    "truncated": ll.DataSpec(),               # max_length: 2 more than the longest prompt
    "truncated-packed": ll.DataSpec(packing=True),
}


def _tokenizer(kind: str):
    """The builtin tokenizer (its template ends the turn with eos), or a base tokenizer given a
    ChatML template (end of turn <|im_end|> != eos) or a template with no end-of-turn token."""
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    if kind != "builtin":
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tok.chat_template = CHATML if kind == "chatml" else PLAIN
    return tok


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    """The exported train.py imported as a module (its main() does not run)."""
    out = export_script(ll.AdapterSpec(r=2), path=tmp_path_factory.mktemp("export"), data=PAIRS)
    spec = importlib.util.spec_from_file_location("exported_tokenize", out.file("train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _with_format(monkeypatch, module, dspec: ll.DataSpec):
    monkeypatch.setattr(module, "FORMAT", asdict(dspec))  # as export_script writes it


@pytest.mark.parametrize("rows", [PAIRS, CHATS], ids=["pairs", "messages"])
@pytest.mark.parametrize("kind", ["builtin", "chatml", "plain"])
@pytest.mark.parametrize("name", list(SPECS))
def test_tokenize_gives_lora_labs_rows(script, monkeypatch, name, kind, rows):
    dspec, tok = SPECS[name].replace(eval_fraction=0), _tokenizer(kind)
    if name.startswith("truncated"):  # every prompt fits; the longest responses are cut
        alone = prepare_dataset(rows, tok, dspec.replace(packing=False)).train["labels"]
        dspec = dspec.replace(max_length=2 + max(labels.count(IGNORE_INDEX) for labels in alone))
    _with_format(monkeypatch, script, dspec)
    want = prepare_dataset(rows, tok, dspec).train.to_dict()
    got = script.tokenize(rows, tok, packing=dspec.packing).to_dict()
    assert got == want  # input_ids, labels, and position_ids (packed) or attention_mask
    assert set(got) == ({"input_ids", "labels", "position_ids"} if dspec.packing
                        else {"input_ids", "labels", "attention_mask"})
    if dspec.packing:  # every example restarts at position 0, and its first label is -100
        for pos, labels in zip(got["position_ids"], got["labels"]):
            assert all(lab == IGNORE_INDEX for p, lab in zip(pos, labels) if p == 0)
        assert len(got["input_ids"]) < len(rows) or name == "truncated-packed"  # (chats fill rows)


def test_chatml_on_a_base_model_ends_the_turn_with_im_end(script, monkeypatch):
    """The supervised tokens are what ChatML writes after the prompt, `answer<|im_end|>\\n`."""
    tok = _tokenizer("chatml")
    _with_format(monkeypatch, script, ll.DataSpec())
    got = script.tokenize(PAIRS[:3], tok)
    for row, labels in zip(PAIRS, got["labels"]):
        supervised = [t for t in labels if t != IGNORE_INDEX]
        assert tok.decode(supervised) == row["response"] + "<|im_end|>\n"
        assert tok.eos_token_id not in supervised
    _with_format(monkeypatch, script, ll.DataSpec(use_chat_template=False))
    labels = script.tokenize(PAIRS[:1], tok)["labels"][0]
    assert labels[-1] == tok.eos_token_id  # no chat template: the response ends with eos


def test_template_that_rewrites_the_prompt_is_refused(script, monkeypatch):
    tok = _tokenizer("builtin")
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}|{% endfor %}"
                         "{% if add_generation_prompt %}>>{% endif %}")
    _with_format(monkeypatch, script, ll.DataSpec())
    with pytest.raises(SystemExit, match="differently"):
        script.tokenize(PAIRS[:1], tok)


@pytest.mark.parametrize("multiple", [None, 8, 64])
@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_collator_and_token_count_are_pad_batch_and_batch_tokens(script, monkeypatch, packing, multiple):
    tok = _tokenizer("chatml")
    dspec = ll.DataSpec(packing=packing, max_length=48, eval_fraction=0)
    _with_format(monkeypatch, script, dspec)
    rows = script.tokenize(PAIRS, tok, packing=packing).to_list()
    got = script.PadCollator(tok.pad_token_id, multiple, 50)(rows)
    want = pad_batch(rows, tok.pad_token_id, multiple_of=multiple, max_length=50)
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want), {k: (got[k], want[k]) for k in want}
    lengths = [len(r["input_ids"]) for r in rows]
    assert len(set(lengths)) > 1  # some rows are padded
    assert script.count_tokens(got) == batch_tokens(want) == sum(lengths)


def test_trainer_loss_on_packed_rows_is_lora_labs(tiny_llama_dir, tmp_path, one_thread):
    """build_trainer's packed batch gives the loss lora_lab's pad_batch batch gives, and both give
    the unpacked loss: no KV cache, no attention_mask, every example attends only to itself."""
    dspec = ll.DataSpec(packing=True, max_length=64, eval_fraction=0.2)
    out = export_script(ll.AdapterSpec(r=2, dropout=0.0), None, ll.TrainSpec(steps=1), dspec,
                        model_id=str(tiny_llama_dir), path=tmp_path / "x", data=PAIRS + PAIRS)
    spec = importlib.util.spec_from_file_location("exported_trainer", out.file("train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    trainer = module.build_trainer("cpu", tmp_path / "out")
    assert trainer.model.config.use_cache is False
    assert "position_ids" in trainer.train_dataset.column_names
    assert "position_ids" not in trainer.eval_dataset.column_names  # eval is never packed

    model, tok = ll.load_model(tiny_llama_dir, device="cpu")
    want = prepare_dataset(PAIRS + PAIRS, tok, dspec)
    assert trainer.train_dataset.to_dict() == want.train.to_dict()
    rows = want.train.to_list()
    trainer.model.train()
    with torch.no_grad():  # LoRA B = 0: the adapter adds nothing yet
        got = trainer.compute_loss(trainer.model, trainer.data_collator(rows))
        packed = model(**pad_batch(rows, tok.pad_token_id), use_cache=False).loss
        alone = prepare_dataset(PAIRS + PAIRS, tok, dspec.replace(packing=False)).train.to_list()
        unpacked = model(**pad_batch(alone, tok.pad_token_id)).loss
    assert abs(float(got) - float(packed)) < 1e-5
    assert abs(float(got) - float(unpacked)) < 1e-4 * float(unpacked)
