"""Per-row adapters stacked along the rank (lora_lab/hf/generate/routing.py): each row of a batch
gets W x + s_k B_k A_k x of its own adapter k (or W x for a base row), as peft computes it, for
adapters of different ranks, scalings (rsLoRA) and targets; ll.generate takes this path for plain
LoRA, peft's per-adapter loop or groups otherwise, with the same tokens; every layer is put back as it was,
also when the call fails."""

import pytest
import torch
from lora_testing import randomize_lora_b

import lora_lab as ll
from lora_lab.hf.generate.routing import stack_reason, stacked_lora

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = ["r2", None, "r4", "r8", "r2"]      # adapters of rank 2, 4 and 8 (rsLoRA); a base row
PROMPTS = ["reverse abc", "upper hello world", "copy xyz", "reverse abc", "sort dcba"]


def _three(model):
    model = ll.attach(model, ll.AdapterSpec(r=2, alpha=4, target_modules="all-linear"), name="r2")
    model = ll.attach(model, ll.AdapterSpec(r=8, alpha=8, use_rslora=True, target_modules="attention-qv"),
                      name="r8")
    model = ll.attach(model, ll.AdapterSpec(r=4, alpha=16, target_modules="all-linear"), name="r4")
    return randomize_lora_b(model, seed=7, scale=0.3).eval()


def _instance_forwards(model):
    return {n: m.__dict__["forward"] for n, m in model.named_modules() if "forward" in m.__dict__}


def test_each_row_gets_its_own_adapter_as_peft_computes_it(tiny_llama):
    model, _ = tiny_llama
    model = _three(model)
    ids = torch.randint(4, 90, (len(ROWS), 9), generator=torch.Generator().manual_seed(0))
    model.set_adapter("r2")
    with torch.no_grad():
        before = model(input_ids=ids).logits
        # oracle 1: peft's own mixed-batch forward ("__base__": no adapter)
        peft_mixed = model(input_ids=ids, adapter_names=[n or "__base__" for n in ROWS]).logits
        # oracle 2: each row alone, with peft's ordinary forward and its adapter active
        alone = []
        for i, n in enumerate(ROWS):
            if n is None:
                with model.disable_adapter():
                    alone.append(model(input_ids=ids[i:i + 1]).logits[0])
            else:
                model.set_adapter(n)
                alone.append(model(input_ids=ids[i:i + 1]).logits[0])
        model.set_adapter("r2")
        assert stack_reason(model, ROWS) is None
        with stacked_lora(model, ROWS):
            stacked = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    torch.testing.assert_close(stacked, peft_mixed, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stacked, torch.stack(alone), rtol=1e-5, atol=1e-5)
    # the rows really differ by adapter (the same tokens would give the same logits otherwise)
    assert (stacked[0] - stacked[2]).abs().max() > 1e-2
    # the layers are back: no instance forward left, the same logits bit for bit
    assert _instance_forwards(model) == {} and torch.equal(before, after)


def test_generate_stacks_mixed_ranks_and_a_base_row_and_equals_each_prompt_alone(tiny_llama):
    model, tok = tiny_llama
    model = _three(model)
    got = ll.generate(model, tok, PROMPTS, adapter=ROWS, max_new_tokens=10)
    want = [ll.generate(model, tok, p, adapter=a, max_new_tokens=10) for p, a in zip(PROMPTS, ROWS)]
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert got[0].settings["batch_mode"] == "mixed" and got[0].settings["batch_note"] == ""
    assert got[0].token_ids != got[3].token_ids          # same prompt, adapters r2 and r8
    assert _instance_forwards(model) == {}


def test_layers_are_restored_when_the_call_fails_and_a_users_patch_survives(tiny_llama):
    model, tok = tiny_llama
    model = _three(model)
    layer = next(m for m in model.modules() if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict))
    calls = []

    def user_forward(x, *args, **kwargs):         # e.g. a user's own instrumentation of one layer
        calls.append(x.shape)
        return type(layer).forward(layer, x, *args, **kwargs)

    layer.forward = user_forward

    def boom(row, piece):
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        ll.generate(model, tok, PROMPTS, adapter=ROWS, max_new_tokens=4, on_token=boom)
    assert _instance_forwards(model) == {"base_model.model." + _name(model, layer): user_forward}
    n = len(calls)
    ll.generate(model, tok, PROMPTS[:2], adapter=ROWS[:2], max_new_tokens=2)   # routed: not called
    assert len(calls) == n
    ll.generate(model, tok, PROMPTS[0], adapter="r2", max_new_tokens=2)          # one adapter: called
    assert len(calls) > n


def _name(model, module):
    return next(n for n, m in model.named_modules() if m is module).removeprefix("base_model.model.")


def test_modules_to_save_takes_peft_s_loop_or_is_grouped_with_the_reason_and_the_same_tokens(tiny_llama):
    from peft import LoraConfig

    model, tok = tiny_llama
    model = _three(model)
    for i, name in enumerate(("head", "head2")):
        model.add_adapter(name, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                           modules_to_save=["lm_head"]))
        with torch.no_grad():   # each adapter's own copy of the head differs from the base's
            head = model.base_model.model.lm_head.modules_to_save[name]
            g = torch.Generator().manual_seed(i)
            head.weight.add_(torch.randn(head.weight.shape, generator=g) * 0.5)
    randomize_lora_b(model, seed=2, scale=0.3)
    model.eval()
    # (peft's loop needs every row's adapter to have its own copy of the head, or the base)
    rows = ["head", "head2", None, "head"]
    assert "trains whole modules" in stack_reason(model, rows)
    got = ll.generate(model, tok, PROMPTS[:4], adapter=rows, max_new_tokens=8)
    want = [ll.generate(model, tok, p, adapter=a, max_new_tokens=8) for p, a in zip(PROMPTS, rows)]
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert got[0].settings["batch_mode"] == "mixed" and "peft's per-adapter" in got[0].settings["batch_note"]
    # an adapter without its own head beside ones with: peft's loop would fail (KeyError), so grouped
    rows = ["head", "r2", None, "head2"]
    got = ll.generate(model, tok, PROMPTS[:4], adapter=rows, max_new_tokens=8)
    want = [ll.generate(model, tok, p, adapter=a, max_new_tokens=8) for p, a in zip(PROMPTS, rows)]
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert got[0].settings["batch_mode"] == "grouped" and "['r2']" in got[0].settings["batch_note"]


def test_qlora_4bit_layers_are_stacked_too(tiny_llama_nf4):
    model, tok = tiny_llama_nf4
    model = _three(model)
    assert stack_reason(model, ROWS) is None
    got = ll.generate(model, tok, PROMPTS, adapter=ROWS, max_new_tokens=8)
    want = [ll.generate(model, tok, p, adapter=a, max_new_tokens=8) for p, a in zip(PROMPTS, ROWS)]
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert got[0].settings["batch_note"] == ""
