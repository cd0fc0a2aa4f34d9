"""check_serving: a saved adapter against vLLM's and SGLang's LoRA limits, read from its files.

The adapters are real ones, saved on builtin:tiny by lora_lab and by plain peft.  Each finding is
asserted against the limit as the engine's own source states it (quoted in each test), and what
the check reads is compared with what peft and safetensors say about the same folder."""

from __future__ import annotations

import copy
import json
import math

import pytest

import lora_lab as ll
from lora_lab.errors import AdapterError, LoraLabError
from lora_lab.hf.adapters.serving_check import check_serving, read_saved_adapter

# vllm/config/lora.py: ``MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]``
VLLM_LITERAL = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# peft warns while saving the odd adapters made on purpose here (lora_bias without a base bias)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Folders saved by ``ll.save_adapter`` and by ``get_peft_model(...).save_pretrained``."""
    from peft import IA3Config, LoraConfig, PromptTuningConfig, get_peft_model

    base, _ = ll.load_model("builtin:tiny")
    root = tmp_path_factory.mktemp("serving_check")
    out = {}
    for name, spec in {"ll_lora8": ll.AdapterSpec(r=8), "ll_dora": ll.AdapterSpec(r=8, use_dora=True),
                       "ll_rslora": ll.AdapterSpec(r=16, alpha=8, use_rslora=True),
                       "ll_ia3": ll.AdapterSpec(method="ia3"),
                       "ll_prompt": ll.AdapterSpec(method="prompt", num_virtual_tokens=4)}.items():
        out[name] = ll.save_adapter(ll.attach(copy.deepcopy(base), spec), root / name)
    qv = ["q_proj", "v_proj"]
    for name, cfg in {
            "peft_r24": LoraConfig(r=24, lora_alpha=48, target_modules=qv),
            "peft_mts": LoraConfig(r=8, target_modules=qv, modules_to_save=["lm_head"]),
            "peft_dora": LoraConfig(r=8, target_modules=qv, use_dora=True),
            "peft_rslora": LoraConfig(r=16, lora_alpha=8, target_modules=qv, use_rslora=True),
            "peft_bias": LoraConfig(r=8, target_modules=qv, bias="all"),
            "peft_lora_bias": LoraConfig(r=8, target_modules=qv, lora_bias=True),
            "peft_pattern": LoraConfig(r=8, target_modules=["q_proj", "o_proj"],
                                       rank_pattern={"o_proj": 16}),
            "peft_layers": LoraConfig(r=8, target_modules=qv, layers_to_transform=[0]),
            "peft_embed": LoraConfig(r=8, target_modules=["embed_tokens", "q_proj"]),
            "peft_ia3": IA3Config(task_type="CAUSAL_LM"),
            "peft_prompt": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)}.items():
        model = get_peft_model(copy.deepcopy(base), cfg)
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


def levels(check, topic):
    return [f.level for f in check.findings if f.topic == topic]


def test_the_header_is_what_safetensors_reads(saved):
    """The check reads names and shapes from the header alone; safetensors' reader is the oracle."""
    from safetensors import safe_open

    for name in ("ll_lora8", "peft_mts", "ll_dora"):
        adapter = read_saved_adapter(saved[name])
        with safe_open(str(saved[name] / "adapter_model.safetensors"), framework="pt") as f:
            want = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        assert adapter.tensors == want
        assert adapter.config == json.loads((saved[name] / "adapter_config.json").read_text())


def test_plain_lora_r8_is_served_by_both(saved):
    """vllm/config/lora.py: r=8 is itself an allowed ``max_lora_rank``; SGLang takes any rank."""
    for engine in ("vllm", "sglang"):
        check = check_serving(saved["ll_lora8"], engine)
        assert check.ok, str(check)
        assert check.rank == 8
        assert set(check.modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                      "up_proj", "down_proj"}      # all-linear on a Llama
        assert levels(check, "architecture") == ["ok"]                # LlamaForCausalLM
    assert "--max-lora-rank 8" in str(check_serving(saved["ll_lora8"], "vllm"))


def test_rank_24_needs_a_rank_32_slot_in_vllm(saved):
    """vLLM: ``MaxLoRARanks = Literal[1, 8, 16, 32, ...]`` and ``validate_legal`` refuses only
    ``r > max_lora_rank``: 24 is no allowed value, yet r=24 is served with --max-lora-rank 32."""
    check = check_serving(saved["peft_r24"], "vllm")
    assert check.ok and check.rank == 24 and 24 not in VLLM_LITERAL
    want = min(v for v in VLLM_LITERAL if v >= 24)
    assert want == 32
    assert f"--max-lora-rank {want}" in str(check) and "not an allowed value" in str(check)
    sg = check_serving(saved["peft_r24"], "sglang")
    assert sg.ok and "--max-lora-rank 24" in str(sg)            # SGLang: any integer


def test_a_rank_above_512_is_refused_by_vllm_only(saved, tmp_path):
    """The largest vLLM ``max_lora_rank`` is 512 (vllm/config/lora.py)."""
    big = tmp_path / "big"
    big.mkdir()
    cfg = json.loads((saved["peft_r24"] / "adapter_config.json").read_text())
    (big / "adapter_config.json").write_text(json.dumps({**cfg, "r": 1024}))
    (big / "adapter_model.safetensors").write_bytes(
        (saved["peft_r24"] / "adapter_model.safetensors").read_bytes())
    assert levels(check_serving(big, "vllm"), "rank") == ["error"]
    assert max(VLLM_LITERAL) == 512
    assert check_serving(big, "sglang").ok


@pytest.mark.parametrize("name", ["ll_dora", "peft_dora"])
def test_dora_is_refused_by_both(saved, name):
    """vllm/lora/peft_helper.py: ``"vLLM does not yet support DoRA."``; sglang lora_manager.py
    validate_new_adapter: ``"LoRA serving currently doesn't support DoRA adapters"``."""
    adapter = read_saved_adapter(saved[name])
    assert any("lora_magnitude_vector" in k for k in adapter.extra_tensors)   # what peft saved
    for engine in ("vllm", "sglang"):
        check = check_serving(saved[name], engine)
        assert not check.ok and levels(check, "dora") == ["error"]


@pytest.mark.parametrize("name", ["ll_rslora", "peft_rslora"])
def test_rslora_vllm_scales_like_peft_sglang_does_not(saved, name):
    """vllm/lora/peft_helper.py: ``vllm_lora_scaling_factor = lora_alpha / math.sqrt(r)`` with
    use_rslora; sglang/srt/lora/lora.py: ``self.scaling = lora_alpha / r`` (use_rslora unread).
    The fix offered for SGLang (α' = α·√r, use_rslora off) must give peft's own scaling."""
    from peft import PeftModel

    base, _ = ll.load_model("builtin:tiny")
    model = PeftModel.from_pretrained(base, str(saved[name]))
    peft_scale = next(m.scaling["default"] for m in model.modules() if hasattr(m, "scaling")
                      and isinstance(getattr(m, "scaling"), dict) and "default" in m.scaling)
    cfg = json.loads((saved[name] / "adapter_config.json").read_text())
    assert peft_scale == pytest.approx(cfg["lora_alpha"] / math.sqrt(cfg["r"]))
    vllm = check_serving(saved[name], "vllm")
    assert vllm.ok and levels(vllm, "rslora") == ["ok"]
    sg = check_serving(saved[name], "sglang")
    assert levels(sg, "rslora") == ["error"]
    msg = next(f.message for f in sg.findings if f.topic == "rslora")
    alpha_fixed = float(msg.split("lora_alpha=")[1].split()[0])
    assert alpha_fixed / cfg["r"] == pytest.approx(peft_scale, rel=1e-5)


def test_modules_to_save_is_refused_by_both(saved):
    """vllm peft_helper: ``"vLLM only supports modules_to_save being None."``; SGLang's LoRAConfig
    (lora_config.py) never reads modules_to_save, so the trained lm_head would be dropped."""
    adapter = read_saved_adapter(saved["peft_mts"])
    assert any("lm_head" in k for k in adapter.extra_tensors)      # the full copy peft saved
    for engine in ("vllm", "sglang"):
        assert levels(check_serving(saved["peft_mts"], engine), "modules_to_save") == ["error"]


def test_biases_are_refused_by_both(saved):
    """vllm peft_helper validate_legal: ``"Adapter bias is not supported."`` (bias != "none") and
    ``"vLLM does not support LoRA bias (lora_bias)."``; SGLang's LoRAConfig reads neither."""
    for engine in ("vllm", "sglang"):
        assert levels(check_serving(saved["peft_bias"], engine), "bias") == ["error"]
        assert levels(check_serving(saved["peft_lora_bias"], engine), "lora_bias") == ["error"]


def test_rank_pattern_vllm_warns_sglang_refuses(saved):
    """Recent vLLM applies rank_pattern (PEFTHelper.get_rank_and_scaling; the max over the patterns
    is checked against max_lora_rank), older ones ignore it; SGLang refuses an adapter whose
    rank_pattern changes a module's rank (TestLoRAPatternValidation)."""
    v = check_serving(saved["peft_pattern"], "vllm")
    assert v.rank == 16 and levels(v, "patterns") == ["warning"] and "--max-lora-rank 16" in str(v)
    s = check_serving(saved["peft_pattern"], "sglang")
    assert levels(s, "patterns") == ["error"]


def test_layers_to_transform_serves_the_layers_saved(saved):
    adapter = read_saved_adapter(saved["peft_layers"])
    assert all(".layers.0." in k for k in adapter.tensors)           # only layer 0 was saved
    for engine in ("vllm", "sglang"):
        check = check_serving(saved["peft_layers"], engine)
        assert check.ok and levels(check, "layers") == ["ok"]


def test_lora_on_the_embedding_is_a_version_warning(saved):
    """vllm/config/lora.py: extra-vocabulary LoRA ``is being phased out``; SGLang adapts
    embed_tokens / lm_head only in recent versions (lora/utils.py get_hidden_dim)."""
    for engine in ("vllm", "sglang"):
        check = check_serving(saved["peft_embed"], engine)
        assert "embed_tokens" in check.modules and "warning" in levels(check, "target_modules")


@pytest.mark.parametrize("name", ["ll_ia3", "ll_prompt", "peft_ia3", "peft_prompt"])
def test_non_lora_methods_are_refused_by_both(saved, name):
    """vLLM's PEFTHelper requires ``r, lora_alpha, target_modules``; sglang lora.py asserts
    ``hf_config["peft_type"].lower() == "lora"``."""
    peft_type = json.loads((saved[name] / "adapter_config.json").read_text())["peft_type"]
    assert peft_type in ("IA3", "PROMPT_TUNING")
    for engine in ("vllm", "sglang"):
        check = check_serving(saved[name], engine)
        assert not check.ok and levels(check, "method") == ["error"]
        assert check.rank is None
        assert peft_type in str(check)


def test_an_unknown_target_module_is_an_error(saved, tmp_path):
    """vllm/lora/models.py refuses modules outside the model's LoRA modules ('expected target
    modules in ... but received ...'); SGLang's --lora-target-modules has fixed choices."""
    import shutil

    shutil.copytree(saved["ll_lora8"], tmp_path / "odd")
    st = tmp_path / "odd" / "adapter_model.safetensors"
    st.write_bytes(st.read_bytes().replace(b"q_proj", b"c_attn"))     # same length: header stays valid
    adapter = read_saved_adapter(tmp_path / "odd")
    assert "c_attn" in adapter.modules
    for engine in ("vllm", "sglang"):
        assert "error" in levels(check_serving(tmp_path / "odd", engine), "target_modules")
        # a base that is not a local folder: its architecture, and so its module names, are unknown
        other = check_serving(tmp_path / "odd", engine, base="org/some-model")
        assert "error" not in levels(other, "target_modules")
        assert "warning" in levels(other, "target_modules")
        assert levels(other, "architecture") == ["warning"]


def test_the_report_reads_as_text_and_html(saved):
    check = check_serving(saved["ll_dora"], "vllm")
    text, html = str(check), check._repr_html_()
    assert "CANNOT be served" in text and "source: vllm/lora/peft_helper.py" in text
    assert "<table>" in html and "DoRA" in html and "peft_helper.py" in html


def test_not_an_adapter_gets_a_problem_and_a_fix(saved, tmp_path):
    cases = {}
    cases["missing"] = tmp_path / "missing"
    (tmp_path / "empty").mkdir()
    cases["empty"] = tmp_path / "empty"
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    (tmp_path / "bin" / "adapter_model.bin").write_bytes(b"x")
    cases["bin"] = tmp_path / "bin"
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    (tmp_path / "broken" / "adapter_model.safetensors").write_bytes(b"\xff" * 4)
    cases["broken"] = tmp_path / "broken"
    (tmp_path / "notpeft").mkdir()
    (tmp_path / "notpeft" / "adapter_config.json").write_text('{"hidden_size": 4}')
    cases["notpeft"] = tmp_path / "notpeft"
    (tmp_path / "norank").mkdir()
    (tmp_path / "norank" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": null}')
    cases["norank"] = tmp_path / "norank"
    for name, path in cases.items():
        with pytest.raises(LoraLabError) as err:
            check_serving(path, "vllm")
        assert isinstance(err.value, AdapterError) and err.value.fix, name
        assert str(path) in err.value.problem, name
    assert "pickled .bin" in str(pytest.raises(AdapterError, read_saved_adapter, cases["bin"]).value)
    with pytest.raises(AdapterError, match="tgi"):
        check_serving(saved["ll_lora8"], "tgi")
