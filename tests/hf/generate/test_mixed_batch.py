"""One batch, an adapter per row: every row's greedy tokens equal that prompt generated alone with
its adapter (the oracle: transformers' own single-prompt ``generate`` through peft with that adapter
active), on builtin:tiny and on SmolLM2-135M; the whole batch takes one forward pass per token;
adapters peft cannot mix are routed in groups; bad input is refused before anything changes."""

import pytest
import torch
from lora_testing import randomize_lora_b

import lora_lab as ll
from lora_lab.errors import AdapterError, LoraLabError, SpecError
from lora_lab.hf.generate.decode import stop_token_ids

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["reverse abc", "upper hello world", "reverse abc", "copy xyz", "reverse abc", "sort dcba"]
ROWS = ["up", "rs", None, "up", "rs", None]


@pytest.fixture(scope="module")
def tiny_two():
    """builtin:tiny with LoRA "up" (r=4, all linear) and rsLoRA "rs" (r=8, attention only)."""
    model, tok = ll.load_model("builtin:tiny", device="cpu")
    model = ll.attach(model, ll.AdapterSpec(r=4, alpha=8, target_modules="all-linear"), name="up")
    model = ll.attach(model, ll.AdapterSpec(r=8, alpha=8, use_rslora=True,
                                            target_modules="attention-qv"), name="rs")
    randomize_lora_b(model, seed=3, scale=0.5)
    return model.eval(), tok


def _alone(model, tok, prompts, names, n):
    return [ll.generate(model, tok, p, adapter=a, max_new_tokens=n) for p, a in zip(prompts, names)]


def test_each_row_equals_its_prompt_alone_with_its_adapter_in_one_pass_per_token(tiny_two):
    model, tok = tiny_two
    ll.set_adapter(model, "rs")
    sizes = []
    hook = model.get_base_model().register_forward_pre_hook(
        lambda m, a, kw: sizes.append(kw["input_ids"].shape[0]), with_kwargs=True)
    try:
        got = ll.generate(model, tok, PROMPTS, adapter=ROWS, max_new_tokens=12)
    finally:
        hook.remove()
    want = _alone(model, tok, PROMPTS, ROWS, 12)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert [g.text for g in got] == [w.text for w in want]
    assert [g.adapter for g in got] == ROWS and [g.finish_reason for g in got] == [
        w.finish_reason for w in want]
    # one forward over all six rows per new token (prefill included), not one per row or group
    assert set(sizes) == {len(PROMPTS)} and len(sizes) == max(g.n_tokens for g in got)
    assert {g.settings["batch_mode"] for g in got} == {"mixed"}
    # the adapters matter: the same prompt comes out differently under a, b and the base
    assert len({got[k].token_ids for k in (0, 2, 4)}) == 3
    # the active adapter and eval mode are as before
    assert ll.active_adapter(model) == "rs" and not model.training


def test_rows_stop_on_their_own_and_one_adapter_for_all_rows_still_works(tiny_two):
    model, tok = tiny_two
    got = ll.generate(model, tok, PROMPTS, adapter=ROWS, max_new_tokens=30)
    lengths = [g.n_tokens for g in got]
    assert any(g.finish_reason == "eos" for g in got) and len(set(lengths)) > 1, lengths
    stop = set(stop_token_ids(model, tok))
    for g in got:   # a finished row ends on its stop token and has nothing after it
        assert (g.token_ids[-1] in stop) == (g.finish_reason == "eos")
        assert not stop & set(g.token_ids[:-1])
    same = ll.generate(model, tok, PROMPTS[:3], adapter="up", max_new_tokens=8)
    alone = _alone(model, tok, PROMPTS[:3], ["up"] * 3, 8)
    assert [g.token_ids for g in same] == [w.token_ids for w in alone]
    assert {g.settings["batch_mode"] for g in same} == {"uniform"}
    single = ll.generate(model, tok, "reverse abc", adapter="up", max_new_tokens=8)
    assert isinstance(single, ll.GenerationResult) and single.token_ids == same[0].token_ids


def test_on_token_streams_each_rows_pieces(tiny_two):
    model, tok = tiny_two
    pieces: dict[int, str] = {}
    got = ll.generate(model, tok, PROMPTS[:4], adapter=ROWS[:4], max_new_tokens=10,
                      on_token=lambda row, piece: pieces.__setitem__(row, pieces.get(row, "") + piece))
    assert all(pieces.get(k, "") == g.text for k, g in enumerate(got))


def test_dora_cannot_mix_so_its_rows_are_grouped_and_still_exact(tiny_llama):
    model, tok = tiny_llama
    model = ll.attach(model, ll.AdapterSpec(r=4, target_modules="all-linear"), name="plain")
    model = ll.attach(model, ll.AdapterSpec(r=4, use_dora=True, target_modules="all-linear"), name="dora")
    randomize_lora_b(model, seed=5, scale=0.5).eval()
    rows = ["dora", "plain", None, "dora"]
    got = ll.generate(model, tok, PROMPTS[:4], adapter=rows, max_new_tokens=8)
    assert [g.token_ids for g in got] == [w.token_ids for w in _alone(model, tok, PROMPTS[:4], rows, 8)]
    assert got[0].settings["batch_mode"] == "grouped" and "DoRA" in got[0].settings["batch_note"]


def _state(model):
    return (ll.active_adapter(model), model.training,
            {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n})


def _same(a, b):
    return a[:2] == b[:2] and all(torch.equal(a[2][n], b[2][n]) for n in a[2])


def test_bad_input_is_refused_with_the_fix_and_changes_nothing(tiny_two):
    model, tok = tiny_two
    before = _state(model)
    with pytest.raises(AdapterError, match=r"'nope'.*loaded: \['rs', 'up'\]"):
        ll.generate(model, tok, PROMPTS[:2], adapter=["up", "nope"])
    with pytest.raises(AdapterError, match="3 adapters for 2 prompts"):
        ll.generate(model, tok, PROMPTS[:2], adapter=["up", "rs", None])
    with pytest.raises(SpecError, match="list of prompts"):
        ll.generate(model, tok, "reverse abc", adapter=["up"])
    with pytest.raises(SpecError, match="one prompt"):
        next(ll.stream_generate(model, tok, PROMPTS[:2], adapter=["up", "rs"]))
    model.train()
    with pytest.raises(AdapterError, match="training mode") as err:
        ll.generate(model, tok, PROMPTS[:2], adapter=["up", "rs"])
    assert "model.eval()" in err.value.fix
    model.eval()
    assert _same(before, _state(model)) and isinstance(err.value, LoraLabError)


def test_a_merged_adapter_is_refused_with_the_fix(tiny_llama):
    model, tok = tiny_llama
    for n in ("up", "rs"):
        model = ll.attach(model, ll.AdapterSpec(r=4, target_modules="attention-qv"), name=n)
    randomize_lora_b(model, seed=1).eval()
    ll.merge_adapter(model, "up")
    with pytest.raises(AdapterError, match="merged") as err:
        ll.generate(model, tok, PROMPTS[:2], adapter=["up", "rs"])
    assert "unmerge" in err.value.fix


@pytest.mark.slow
def test_smollm2_mixed_batch_equals_each_prompt_alone(smollm2_dir):
    model, tok = ll.load_model("builtin:smollm2", device="cpu")
    for n in ("t1", "t2"):
        model = ll.attach(model, ll.AdapterSpec(r=4, alpha=8, target_modules="attention-qv"), name=n)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():   # adapters big enough to change the answers, small enough to stay fluent
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.eval()
    prompts = ["Name a colour.", "What is the capital of France?", "Name a colour."]
    rows = ["t1", None, "t2"]
    got = ll.generate(model, tok, prompts, adapter=rows, max_new_tokens=10)
    want = _alone(model, tok, prompts, rows, 10)
    assert [x.token_ids for x in got] == [w.token_ids for w in want], ([x.text for x in got],
                                                                      [w.text for w in want])
    assert got[0].settings["batch_mode"] == "mixed"
    assert got[0].token_ids != got[2].token_ids      # two adapters, one prompt, two answers
    # the base row ends its turn (<|im_end|>) after "Paris." while the others go on
    assert got[1].finish_reason == "eos" and got[1].text.strip().endswith("Paris.")
    assert got[0].finish_reason == "length", got
