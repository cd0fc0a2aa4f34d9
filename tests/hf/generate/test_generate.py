"""Streamed generation: pieces concatenate to the greedy output, stopping keeps the tokens so far,
adapters are chosen per call and restored, and sampling is reproducible from a seed."""

import threading

import pytest
import torch
from lora_testing import randomize_lora_b

import lora_lab as ll
from lora_lab.errors import AdapterError, SpecError
from lora_lab.hf.adapters.switch import ACTIVE, switch_adapter
from lora_lab.hf.data.prepare import encode_prompt
from lora_lab.hf.generate.batch import generate_greedy
from lora_lab.hf.generate.stream import generate, stream_generate

PROMPT = "reverse abc"


pytestmark = pytest.mark.usefixtures("one_thread")


def with_adapters(model, names=("x1", "x2"), targets="all-linear"):
    for n in names:
        model = ll.attach(model, ll.AdapterSpec(r=4, alpha=8, target_modules=targets), name=n)
    return randomize_lora_b(model, seed=7, scale=0.5)


def test_streamed_pieces_concatenate_to_the_greedy_output(tiny_llama):
    model, tok = tiny_llama
    pieces = []
    res = generate(model, tok, PROMPT, max_new_tokens=20, on_token=pieces.append)
    oracle = generate_greedy(model, tok, [encode_prompt(tok, PROMPT)], 20)[0]
    assert res.text == oracle and "".join(pieces) == res.text
    assert res.n_tokens == len(res.token_ids) > 0 and res.prompt_tokens == len(encode_prompt(tok, PROMPT))
    assert res.finish_reason in ("eos", "length")
    assert "".join(stream_generate(model, tok, PROMPT, max_new_tokens=20)) == oracle


def test_tokens_per_s_is_new_tokens_over_the_time_of_the_forwards(tiny_llama):
    """Each forward is slowed by a known 10 ms: the rate must count the new tokens over a time that
    holds every forward (so at most 1 / 10 ms per forward) and no more than the call's own wall time."""
    import time

    model, tok = tiny_llama
    forwards = []

    def slow(module, args):
        forwards.append(1)
        time.sleep(0.01)

    model.register_forward_pre_hook(slow)
    t0 = time.perf_counter()
    res = generate(model, tok, PROMPT, max_new_tokens=12)
    wall = time.perf_counter() - t0
    assert res.n_tokens == len(res.token_ids) > 0 and len(forwards) >= res.n_tokens
    assert len(forwards) * 0.01 <= res.seconds <= wall
    assert res.tokens_per_s == pytest.approx(res.n_tokens / res.seconds)
    assert res.n_tokens / wall <= res.tokens_per_s <= res.n_tokens / (len(forwards) * 0.01)
    assert 0.01 <= res.first_token_s <= res.seconds


def test_stopping_midway_returns_the_tokens_so_far(tiny_llama):
    model, tok = tiny_llama
    full = generate(model, tok, PROMPT, max_new_tokens=24)
    assert full.finish_reason == "length", "the tiny model must not end early for this test"
    flag, seen = threading.Event(), []

    def on_token(piece):
        seen.append(piece)
        if len(seen) == 5:
            flag.set()
    part = generate(model, tok, PROMPT, max_new_tokens=24, on_token=on_token, stop=flag)
    assert part.finish_reason == "stopped" and part.n_tokens == 5
    assert part.token_ids == full.token_ids[:5] and part.text == "".join(seen)
    # a generator left early stops its worker, and a callable works as the stop flag
    gen = stream_generate(model, tok, PROMPT, max_new_tokens=24)
    first = [next(gen), next(gen)]
    gen.close()
    assert "".join(first) == full.text[:len("".join(first))]
    calls = generate(model, tok, PROMPT, max_new_tokens=24, stop=lambda: True)
    assert calls.n_tokens == 1 and calls.finish_reason == "stopped"


def test_adapter_per_call_base_exactly_and_active_restored(tiny_llama):
    base_model, tok = tiny_llama
    base_out = generate(base_model, tok, PROMPT, max_new_tokens=16)
    model = with_adapters(base_model)
    ll.set_adapter(model, "x2")
    ids = [encode_prompt(tok, PROMPT)]
    a = generate(model, tok, PROMPT, max_new_tokens=16, adapter="x1")
    assert ll.active_adapter(model) == "x2" and a.adapter == "x1"
    ll.set_adapter(model, "x1")
    assert a.text == generate_greedy(model, tok, ids, 16)[0]
    base = generate(model, tok, PROMPT, max_new_tokens=16, adapter=None)
    assert base.token_ids == base_out.token_ids and base.adapter is None
    assert ll.active_adapter(model) == "x1"
    assert generate(model, tok, PROMPT, max_new_tokens=16, adapter=ACTIVE).text == a.text
    assert a.token_ids != base.token_ids            # the random B makes the adapter matter
    ll.merge_adapter(model, "x1")
    with pytest.raises(AdapterError, match="unmerge"):
        generate(model, tok, PROMPT, max_new_tokens=4, adapter="x2")


def test_sampling_is_seeded_and_settings_are_validated(tiny_llama):
    model, tok = tiny_llama
    kw = dict(max_new_tokens=16, greedy=False, temperature=1.5, top_p=0.9)
    state = torch.get_rng_state()
    s1, s2 = generate(model, tok, PROMPT, seed=3, **kw), generate(model, tok, PROMPT, seed=3, **kw)
    assert s1.token_ids == s2.token_ids and torch.equal(state, torch.get_rng_state())
    others = {generate(model, tok, PROMPT, seed=s, **kw).token_ids for s in range(4, 8)}
    assert len(others | {s1.token_ids}) > 1
    for bad, field in [(dict(max_new_tokens=0), "max_new_tokens"),
                       (dict(greedy=False, temperature=0.0), "temperature"),
                       (dict(greedy=False, top_p=1.5), "top_p")]:
        with pytest.raises(SpecError, match=field):
            generate(model, tok, PROMPT, **bad)
    with pytest.raises(SpecError, match="prompt"):
        generate(model, tok, "  ")
    with pytest.raises(SpecError, match="max_new_tokens"):      # raised in the caller's thread
        list(stream_generate(model, tok, PROMPT, max_new_tokens=-1))


def test_generation_on_a_4bit_base(tiny_llama_nf4):
    model, tok = tiny_llama_nf4
    model = with_adapters(model, ("x1",))
    pieces = []
    res = generate(model, tok, PROMPT, max_new_tokens=8, on_token=pieces.append)
    ll.set_adapter(model, "x1")
    assert res.text == generate_greedy(model, tok, [encode_prompt(tok, PROMPT)], 8)[0]
    assert "".join(pieces) == res.text
    assert generate(model, tok, PROMPT, max_new_tokens=8, adapter=None).token_ids != res.token_ids


def logits(model):
    with torch.no_grad():
        return model.eval()(input_ids=torch.arange(3, 19).unsqueeze(0)).logits


def test_switch_adapter_routes_exactly_like_peft_set_adapter(tiny_llama):
    base_logits = logits(tiny_llama[0])
    model = with_adapters(tiny_llama[0], ("x1", "x2"))
    model = with_adapters(model, ("x3",), targets=("q_proj", "v_proj"))  # a subset of layers
    ref, grads = {}, {}

    def trainable():
        return {n for n, p in model.named_parameters() if p.requires_grad}
    for n in ("x1", "x2", "x3", None):                  # the oracle: peft's own calls
        if n is None:
            model.base_model.disable_adapter_layers()
        else:
            model.base_model.enable_adapter_layers()
            model.set_adapter(n)
        ref[n], grads[n] = logits(model), trainable()
    assert torch.equal(ref[None], base_logits) and grads["x1"] and not grads[None]
    assert not torch.equal(ref["x1"], ref["x2"]) and not torch.equal(ref["x3"], base_logits)
    for n in ("x3", "x1", None, "x2", None, "x3", "x1"):
        switch_adapter(model, n)
        assert ll.active_adapter(model) == n and trainable() == grads[n]
        assert torch.equal(logits(model), ref[n])
    ll.delete_adapter(model, "x3")                      # the cached routing follows deletes/adds
    model = ll.attach(model, ll.AdapterSpec(r=4, target_modules=("k_proj",)), name="x3")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B.x3." in n:
                p.normal_()
    ll.set_adapter(model, "x3")
    want3 = logits(model)
    switch_adapter(model, "x2")
    assert torch.equal(logits(model), ref["x2"])
    switch_adapter(model, "x3")
    assert torch.equal(logits(model), want3) and not torch.equal(want3, ref["x3"])
    switch_adapter(model, None)
    ll.set_adapter(model, "x2")                         # the full path picks up from the fast one
    assert torch.equal(logits(model), ref["x2"])
    with pytest.raises(AdapterError, match="no adapter named"):
        switch_adapter(model, "nope")
    ll.merge_adapter(model, "x2")                       # merged: peft's path unmerges first
    with pytest.warns(UserWarning, match="merged"):
        switch_adapter(model, "x1")
    torch.testing.assert_close(logits(model), ref["x1"], rtol=0, atol=1e-5)   # W - sBA rounding
