"""AdapterSwitchboard: switching gives each adapter's own outputs, "(base)" the base exactly, the
widget's state follows its controls, refusals are shown inline, merges are reversible (and never
touch packed 4-bit weights), side by side equals per-adapter greedy generation."""

from __future__ import annotations

import threading

import pytest
import torch
from lora_testing import randomize_lora_b

import lora_lab as ll
from lora_lab.hf.generate.stream import generate
from lora_lab.ui.switchboard import BASE, AdapterSwitchboard

PROMPT = "reverse abc"
NAMES = ("alpha", "beta", "gamma")


pytestmark = pytest.mark.usefixtures("one_thread")


def randomize_b(model, seed):
    return randomize_lora_b(model, seed, scale=0.3)


@pytest.fixture(scope="module")
def folders(tiny_llama_dir, tmp_path_factory):
    """Three saved LoRA adapters (different ranks and targets, random non-zero B)."""
    root = tmp_path_factory.mktemp("adapters")
    specs = {"alpha": ll.AdapterSpec(r=4, alpha=8),
             "beta": ll.AdapterSpec(r=4, alpha=8, target_modules=("q_proj", "v_proj")),
             "gamma": ll.AdapterSpec(r=2, alpha=4)}
    out = {}
    for i, (name, spec) in enumerate(specs.items()):
        model, _ = ll.load_model(tiny_llama_dir)
        torch.manual_seed(100 + i)                       # A's init: independent of test order
        pm = randomize_b(ll.attach(model, spec, name=name), seed=i)
        out[name] = ll.save_adapter(pm, root / name)
    return out


def logits(model):
    ids = torch.arange(5, 25).unsqueeze(0)
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def loaded(tiny_llama, folders, **kw):
    sb = AdapterSwitchboard(*tiny_llama, redraw_every_s=0.0, **kw)
    for name in NAMES:
        sb.folder.value = str(folders[name])
        sb.load_button.click()
        assert sb.error == ""
    sb.prompt.value, sb.max_new_tokens.value = PROMPT, 12
    return sb


def test_switching_equals_each_adapter_alone_and_base_exactly(tiny_llama_dir, tiny_llama, folders,
                                                             monkeypatch):
    import time

    from lora_lab.ui.switchboard import board

    # switch_ms must time the switch itself: the switch is slowed by a known 20 ms here and timed
    # on its own, from outside; switch_ms must be that time (not 0, not the table refresh around it)
    real, timed = board.switch_adapter, []

    def slow_switch(model, name):
        t0 = time.perf_counter()
        time.sleep(0.02)
        real(model, name)
        timed.append((time.perf_counter() - t0) * 1e3)

    monkeypatch.setattr(board, "switch_adapter", slow_switch)
    base_logits = logits(tiny_llama[0])
    sb = loaded(tiny_llama, folders)
    t = sb.adapters.set_index("name")
    assert list(t.index) == list(NAMES) and t.at["gamma", "active"]
    assert t.at["beta", "targets"] == "q_proj,v_proj" and t.at["gamma", "r"] == 2
    assert t.at["alpha", "source"] == str(folders["alpha"])
    assert t.at["alpha", "size_MiB"] == round(t.at["alpha", "params"] * 4 / 2**20, 3)
    assert sb.active.options == (BASE, *NAMES) and "beta" in sb.table.value
    for name in ("alpha", "gamma", "beta", "alpha"):
        timed.clear()
        sb.active.value = name
        assert sb.error == "" and ll.active_adapter(sb.model) == name and len(timed) == 1
        assert timed[0] <= sb.switch_ms < timed[0] + 5, (sb.switch_ms, timed)
        assert f"{sb.switch_ms:.3f} ms" in sb.switch_label.value
        alone = ll.load_adapter(ll.load_model(tiny_llama_dir)[0], folders[name])
        torch.testing.assert_close(logits(sb.model), logits(alone), rtol=0, atol=1e-6)
        assert not torch.allclose(logits(sb.model), base_logits, atol=1e-3)
    sb.active.value = BASE
    assert ll.active_adapter(sb.model) is None and torch.equal(logits(sb.model), base_logits)
    assert sb.adapters["active"].sum() == 0
    code = sb.code()
    assert f"ll.load_adapter(model, {str(folders['gamma'])!r}, name='gamma')" in code
    assert "ll.set_adapter(model, None)" in code and "max_new_tokens=12" in code
    ns = {}
    exec(code, ns)  # a fresh namespace: the script loads the base itself, then the adapters
    assert ns["result"].text == generate(sb.model, sb.tokenizer, PROMPT, max_new_tokens=12).text
    assert sorted(ll.list_adapters(ns["model"])["name"]) == sorted(NAMES)


def test_generation_streams_into_the_widget_and_stop_keeps_the_tokens(tiny_llama, folders):
    sb = loaded(tiny_llama, folders)
    sb.active.value = "beta"
    drawn = []
    sb.output.observe(lambda ch: drawn.append(ch["new"]), names="value")
    sb.generate_button.click()
    res = sb.result
    oracle = generate(sb.model, sb.tokenizer, PROMPT, max_new_tokens=12, adapter="beta")
    assert res.text == oracle.text == sb.output.value and res.adapter == "beta"
    assert len(drawn) >= res.n_tokens and drawn[-1] == res.text      # one redraw per token
    assert "tokens/s" in sb.speed.value and not sb.busy and sb.stop_button.disabled
    # Stop pressed while token 3 is drawn (an observer runs inside the generation)
    sb.max_new_tokens.value = 40
    full = generate(sb.model, sb.tokenizer, PROMPT, max_new_tokens=40)
    assert full.finish_reason == "length"
    sb.output.observe(lambda ch: len(ch["new"]) >= 3 and sb.stop_button.click(), names="value")
    sb.generate_button.click()
    res = sb.result
    assert res.finish_reason == "stopped" and 3 <= res.n_tokens < 40 and len(res.text) == 3
    assert res.token_ids == full.token_ids[:res.n_tokens] and sb.output.value == res.text
    # greedy off: the sliders reach the sampler
    sb.greedy.value, sb.temperature.value, sb.top_p.value = False, 1.3, 0.8
    sb.generate_button.click()
    assert sb.result.settings["greedy"] is False and sb.result.settings["top_p"] == 0.8


def test_background_generation_stops_from_another_thread(tiny_llama, folders):
    sb = loaded(tiny_llama, folders, background=True)
    sb.max_new_tokens.value = 60
    full = generate(sb.model, sb.tokenizer, PROMPT, max_new_tokens=60)
    assert full.finish_reason == "length"
    reached, clicked = threading.Event(), threading.Event()

    def hold(ch):                     # runs on the worker: wait there until Stop was pressed
        if len(ch["new"]) >= 4 and not reached.is_set():
            reached.set()
            clicked.wait(10)
    sb.output.observe(hold, names="value")
    sb.generate_button.click()        # returns at once; generation runs on the worker
    assert reached.wait(30) and sb.busy
    sb.active.value = "alpha"         # refused while generating: the model must not change under it
    assert "generation is running" in sb.error and sb.active.value == "gamma"
    sb.stop_button.click()
    clicked.set()
    sb.wait(30)
    res = sb.result
    assert not sb.busy and res.finish_reason == "stopped" and len(res.text) == 4
    assert res.token_ids == full.token_ids[:res.n_tokens] and sb.output.value == res.text


def test_side_by_side_is_deterministic_and_equals_per_adapter_generation(tiny_llama, folders):
    sb = loaded(tiny_llama, folders)
    assert sb.compare_with.value == (BASE, *NAMES)        # newly loaded adapters join the comparison
    sb.compare_with.value = (BASE, "alpha", "gamma")
    sb.compare_button.click()
    first = {n: r.token_ids for n, r in sb.comparison.items()}
    assert list(first) == [BASE, "alpha", "gamma"] and len(sb.columns.children) == 3
    for n, res in sb.comparison.items():
        alone = generate(sb.model, sb.tokenizer, PROMPT, max_new_tokens=12,
                         adapter=None if n == BASE else n)
        assert res.token_ids == alone.token_ids and sb.column_outputs[n].value == res.text
        assert "tokens/s" in sb.columns.children[list(first).index(n)].children[2].value
    assert len(set(first.values())) == 3                  # the adapters really differ
    assert ll.active_adapter(sb.model) == "gamma"         # comparing leaves the active adapter
    sb.compare_button.click()
    assert {n: r.token_ids for n, r in sb.comparison.items()} == first


def test_merge_then_unmerge_restores_outputs(tiny_llama, folders):
    sb = loaded(tiny_llama, folders)
    sb.active.value = "alpha"
    before = logits(sb.model)
    sb.merge_button.click()
    assert sb.error == "" and sb.adapters.set_index("name").at["alpha", "merged"]
    assert sb.merge_report.rel_logit_diff < 1e-5 and not sb.merge_report.from_quantized
    torch.testing.assert_close(logits(sb.model), before, rtol=0, atol=1e-4)
    sb.merge_button.click()
    assert "merged already" in sb.error
    sb.unmerge_button.click()
    assert sb.error == "" and not sb.adapters["merged"].any() and "back within" in sb.merge_label.value
    assert (logits(sb.model) - before).abs().max() < 1e-5
    sb.merge_button.click()
    sb.active.value = "beta"                              # switching unmerges first, and says so
    assert "unmerged alpha first" in sb.info and not sb.adapters["merged"].any()
    sb.active.value = "alpha"
    assert (logits(sb.model) - before).abs().max() < 1e-5


def test_merge_on_a_4bit_base_makes_a_copy_and_never_touches_packed_weights(tiny_llama_nf4):
    model, tok = tiny_llama_nf4
    pm = randomize_b(ll.attach(model, ll.AdapterSpec(r=4, alpha=8), name="q4"), seed=3)
    packed = {n: p.detach().clone() for n, p in pm.named_parameters() if p.dtype == torch.uint8}
    assert packed
    sb = AdapterSwitchboard(pm, tok)
    sb.merge_button.click()
    assert sb.error == "" and sb.merged_model is not None and sb.merge_report.from_quantized
    assert 0 < sb.merge_report.rel_logit_diff < 0.5 and "not touched" in sb.merge_label.value
    assert f"{sb.merge_report.rel_logit_diff:.2e}" in sb.merge_label.value
    now = dict(pm.named_parameters())
    assert all(torch.equal(now[n], p) for n, p in packed.items())
    assert not sb.adapters["merged"].any()
    sb.unmerge_button.click()
    assert "No adapter is merged in place" in sb.error and "merged_model" in sb.error


def test_blend_sliders_create_a_live_adapter(tiny_llama, folders):
    sb = loaded(tiny_llama, folders)
    assert set(sb.weights) == set(NAMES)
    sb.weights["alpha"].value, sb.weights["gamma"].value = 0.7, -0.3
    sb.combination.value = "cat"
    sb.blend_button.click()
    assert sb.error == "" and ll.active_adapter(sb.model) == "blend" == sb.active.value
    assert sb.blend_report.r == 6 and sb.blend_report.self_check_error < 1e-5
    assert "blend" in sb.weights and sb.blend_name.value == "blend2"
    dense = {n: {f.name: f.delta() for f in ll.lora_factors(sb.model, n)}
             for n in ("alpha", "gamma", "blend")}
    for k, d in dense["blend"].items():
        torch.testing.assert_close(d, 0.7 * dense["alpha"][k] - 0.3 * dense["gamma"][k],
                                   rtol=1e-4, atol=1e-6)
    sb.combination.value = "linear"                       # ranks 4 and 2: peft's linear is wrong
    sb.blend_button.click()
    assert "one rank" in sb.error and "blend2" not in sb.active.options
    sb.weights["gamma"].value = 0.0
    sb.weights["alpha"].value = 0.0
    sb.weights["blend"].value = 0.0
    sb.blend_button.click()
    assert "Every blend weight is 0" in sb.error
    rep = sb.blend({"alpha": 0.5, "gamma": 0.5}, combination="cat", name="mix")
    assert ll.active_adapter(sb.model) == "mix" and rep.r == 6


def test_the_blend_self_check_and_refusals_show_inline(tiny_llama):
    model, tok = tiny_llama
    pm = ll.attach(model, ll.AdapterSpec(r=4, use_rslora=True), name="rs1")
    pm = randomize_b(ll.attach(pm, ll.AdapterSpec(r=4, use_rslora=True), name="rs2"), seed=5)
    sb = AdapterSwitchboard(pm, tok)
    sb.weights["rs1"].value = sb.weights["rs2"].value = 0.5
    sb.blend_button.click()
    assert "rsLoRA" in sb.error and "⚠" in sb.message.value
    sb.allow_known_bugs.value = True                      # peft tries; the self-check must catch it
    sb.blend_button.click()
    assert "Self-check failed" in sb.error and sb.active.options == (BASE, "rs1", "rs2")


def test_invalid_actions_show_a_message_and_change_nothing(tiny_llama, folders, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    sb = AdapterSwitchboard(*tiny_llama)
    assert sb.adapters.empty and sb.active.options == (BASE,)
    for button in (sb.merge_button, sb.unmerge_button, sb.delete_button, sb.load_button):
        button.click()
        assert sb.error and "⚠" in sb.message.value
    sb.folder.value = str(tmp_path / "missing")
    sb.load_button.click()
    assert "not a saved adapter" in sb.error
    other = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2))
    ll.save_adapter(ll.attach(other, ll.AdapterSpec(r=2)), tmp_path / "wrong")
    sb.folder.value = str(tmp_path / "wrong")
    sb.load_button.click()
    assert "does not fit this base model" in sb.error and sb.adapters.empty
    sb.folder.value = str(folders["alpha"])
    sb.load_button.click()
    assert sb.error == "" and list(sb.adapters["name"]) == ["alpha"]
    sb.delete_button.click()
    assert "only adapter" in sb.error
    sb.load_button.click()                                # the same name twice
    assert "already has an adapter named 'alpha'" in sb.error
    sb.load_name.value = "again"
    sb.load_button.click()
    assert sb.active.value == "again"
    sb.delete_button.click()
    assert sb.error == "" and sb.active.options == (BASE, "alpha") and sb.active.value == BASE
    sb.prompt.value = ""
    sb.generate_button.click()
    assert "prompt" in sb.error and not sb.busy
    with pytest.raises(ll.LoraLabError, match="no adapter named"):
        sb.activate("nope")


def test_the_board_is_made_of_tabs_that_know_only_a_host(tiny_llama, folders):
    """The tabs never import the board: each works with any object that has the Host's members;
    the board shows the tabs' widgets and results under their old names."""
    import ast
    import dataclasses
    from pathlib import Path

    from lora_lab.ui import switchboard
    from lora_lab.ui.switchboard.generate_tab import GenerateTab

    for path in Path(switchboard.__file__).parent.glob("*_tab.py"):
        tree = ast.parse(path.read_text())
        found = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not {m for m in found if m and m.endswith("board")}, path.name

    @dataclasses.dataclass
    class StandIn:                        # the Host Protocol, and nothing else
        model: object
        tokenizer: object
        spec: object = None
        busy: bool = False
        redraw_every_s: float = 0.0
        stop_flag: threading.Event = dataclasses.field(default_factory=threading.Event)
        blends: dict = dataclasses.field(default_factory=dict)
        said: list = dataclasses.field(default_factory=list)

        def names(self): return []
        def say(self, text, error=False): self.said.append((text, error))
        def safely(self, action): action()
        def guard(self): pass
        def unmerge_first(self): return ""
        def refresh(self, structure=True): pass
        def launch(self, job): job()

    host = StandIn(*tiny_llama)
    tab = GenerateTab(host)
    tab.prompt.value, tab.max_new_tokens.value = PROMPT, 6
    tab.generate_button.click()
    assert tab.result.text == generate(*tiny_llama, PROMPT, max_new_tokens=6).text == tab.output.value

    sb = loaded(tiny_llama, folders)
    tabs = sb.children[3]
    assert list(tabs.children) == [sb.generate_tab, sb.compare_tab, sb.merge_tab, sb.blend_tab]
    assert [tabs.get_title(i) for i in range(4)] == ["generate", "side by side", "merge / delete",
                                                     "blend"]
    assert sb.prompt is sb.generate_tab.prompt and sb.weights is sb.blend_tab.weights
    assert sb.merge_report is None and sb.compare_with is sb.compare_tab.compare_with
