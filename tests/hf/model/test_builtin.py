"""builtin:tiny and the builtin tasks: loads offline, the tasks are new to it, and LoRA learns them.

Budget: about 20 s on 2 cores, most of it one short LoRA run on the easiest task.
"""

from __future__ import annotations

import pytest
import torch

import lora_lab as ll
from lora_lab.hf.data.prepare import encode_prompt, prepare_dataset
from lora_lab.hf.data.tasks import sample_examples
from lora_lab.hf.generate.batch import generate_greedy
from lora_lab.hf.model.builtin import builtin_card, builtin_names, resolve_builtin

N_EVAL = 48


@pytest.fixture(scope="module")
def tiny():
    return ll.load_model("builtin:tiny", device="cpu")


def test_tiny_is_listed_and_loads_offline_as_fp32_llama(tiny):
    model, tok = tiny
    assert builtin_names()[:2] == ["builtin:tiny", "builtin:tiny-random"]
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32  # stored fp16, loaded in the CPU default dtype
    size = (resolve_builtin("builtin:tiny") / "model.safetensors").stat().st_size
    assert size <= 10 * 2**20
    assert {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id} == {0, 1, 2}
    assert encode_prompt(tok, "12+34") == tok("<s>Q: 12+34\nA: ", add_special_tokens=False)["input_ids"]
    card = builtin_card()
    assert card["parameters"] == sum(p.numel() for p in model.parameters())


def test_tiny_loads_in_nf4_and_keeps_its_skills(tiny):
    import bitsandbytes as bnb

    model, tok = ll.load_model("builtin:tiny", quant="nf4", device="cpu")
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    data = ll.builtin_task("copy", n=N_EVAL, split="test")
    full, nf4 = ll.task_accuracy(tiny[0], tiny[1], data), ll.task_accuracy(model, tok, data)
    # the model card: copy 100% held out; measured 48/48 in fp32 and in NF4 (also 200/200 both):
    # 4-bit weights keep the skill.  One miss is allowed for float differences between CPUs.
    assert full == 1.0 and nf4 >= 1 - 1 / N_EVAL, (full, nf4)


def test_pretrained_weights_know_their_skills_and_random_ones_do_not(tiny):
    data = ll.builtin_task("pretrain-eval", n=N_EVAL, split="test")
    random_model, tok = ll.load_model("builtin:tiny-random", device="cpu")
    assert ll.task_accuracy(*tiny, data) > 0.5
    assert ll.task_accuracy(random_model, tok, data) == 0.0


@pytest.mark.parametrize("task", ll.builtin_tasks())
def test_base_model_is_under_20_percent_on_each_task(tiny, task):
    assert ll.task_accuracy(*tiny, ll.builtin_task(task, n=N_EVAL, split="test")) < 0.2


def test_task_accuracy_is_exact_match_of_greedy_generation(tiny):
    model, tok = tiny
    rows = sample_examples("add", 24, seed=3, split="test")
    ids = [encode_prompt(tok, p) for p, _ in rows]
    own = generate_greedy(model, tok, ids, max_new_tokens=6, batch_size=24)
    assert generate_greedy(model, tok, ids, max_new_tokens=6, batch_size=5) == own  # padding-free
    from datasets import Dataset

    as_answers = Dataset.from_dict({"prompt": [p for p, _ in rows], "response": own})
    assert ll.task_accuracy(model, tok, as_answers, max_new_tokens=6) == 1.0
    wrong = as_answers.map(lambda r: {"response": r["response"] + "x"})
    assert ll.task_accuracy(model, tok, wrong, max_new_tokens=6) == 0.0


def test_tasks_are_reproducible_and_splits_disjoint():
    a = ll.builtin_task("reverse", n=50, seed=7)
    assert a["prompt"] == ll.builtin_task("reverse", n=50, seed=7)["prompt"]
    assert a["response"] == [p.split()[1][::-1] for p in a["prompt"]]
    train = {p for p, _ in sample_examples("subtract", 2000)}
    test = {p for p, _ in sample_examples("subtract", 300, split="test")}
    assert not train & test
    with pytest.raises(ll.LoraLabError, match="next.*sort"):
        ll.builtin_task("unknown")


def test_lora_on_the_easiest_task_lifts_accuracy_far_above_base(tiny, tmp_path):
    task = ll.builtin_tasks()[0]
    test = ll.builtin_task(task, n=N_EVAL, split="test")
    base_acc = ll.task_accuracy(*tiny, test)
    model, tok = ll.load_model("builtin:tiny", device="cpu")
    model = ll.attach(model, ll.AdapterSpec(r=8, target_modules="all-linear"))
    data = prepare_dataset(ll.builtin_task(task, n=640), tok, ll.DataSpec(eval_fraction=0))
    ll.train(model, tok, data, spec=ll.TrainSpec(steps=40, batch_size=16, lr=3e-3, seed=0,
                                                 output_dir=str(tmp_path)))
    assert ll.task_accuracy(model, tok, test) >= base_acc + 0.5
