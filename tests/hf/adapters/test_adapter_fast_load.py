"""The fast path of ``load_adapter`` (plain LoRA onto layers that are already LoRA layers) against
peft's own ``PeftModel.load_adapter``: same logits for every adapter, same parameters, dtypes and
``requires_grad``, a lossless save round trip, and peft's path for everything else."""

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

import lora_lab as ll
from lora_lab.hf.adapters import io as adapter_io

IDS = torch.randint(4, 90, (2, 10), generator=torch.Generator().manual_seed(0))
FIRST = ll.AdapterSpec(r=4)                       # all-linear: wraps every linear layer
PLAIN = {
    "r8_a32": ll.AdapterSpec(r=8, alpha=32),
    "rs_r2": ll.AdapterSpec(r=2, alpha=3, use_rslora=True),
    "qv_l1": ll.AdapterSpec(r=6, target_modules=("q_proj", "v_proj"), layers=(1,), dropout=0.1),
}


def _save(model_dir, tmp_path, name, spec, seed):
    """Attach ``spec`` to a fresh base, give A and B random non-zero values, save it."""
    model, _ = ll.load_model(model_dir, device="cpu")
    pm = ll.attach(model, spec, name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if f".{name}." in n and ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return ll.save_adapter(pm, tmp_path / name, adapter=name)


@pytest.fixture(scope="module")
def folders(tiny_llama_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fast_load")
    specs = {"first": FIRST, **PLAIN, "dora": ll.AdapterSpec(r=4, use_dora=True),
             "qv_only": ll.AdapterSpec(r=4, target_modules="attention-qv")}
    return {n: _save(tiny_llama_dir, tmp, n, s, i + 1) for i, (n, s) in enumerate(specs.items())}


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _peft_load(base, path, name):
    """``path`` loaded onto ``base`` by peft alone (``PeftModel.from_pretrained``), no lora_lab code."""
    return PeftModel.from_pretrained(base, str(path), adapter_name=name)


def _two_models(model_dir, folders, first="first"):
    """The first adapter loaded by lora_lab (``fast``, which later adapters join through lora_lab's
    fast path) and by peft alone (``ref``, which later adapters join through peft's own
    ``load_adapter``)."""
    fast = ll.load_adapter(ll.load_model(model_dir, device="cpu")[0], folders[first], name=first)
    ref = _peft_load(ll.load_model(model_dir, device="cpu")[0], folders[first], first)
    return fast, ref


def _counts():
    return dict(adapter_io._LOAD_PATHS)


def test_fast_path_equals_peft_for_every_adapter(tiny_llama_dir, folders):
    fast, ref = _two_models(tiny_llama_dir, folders)
    before = _counts()
    for name in PLAIN:
        fast = ll.load_adapter(fast, folders[name], name=name)
        ref.load_adapter(str(folders[name]), adapter_name=name)
        ref.set_adapter(name)
    assert _counts()["fast"] - before["fast"] == len(PLAIN)
    assert _counts()["peft"] == before["peft"]
    base = None
    for name in ["first", *PLAIN]:
        ll.set_adapter(fast, name)
        ref.set_adapter(name)               # peft's own switch
        assert fast.active_adapter == name
        got, want = logits(fast), logits(ref)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        with fast.disable_adapter():
            base = logits(fast)
        assert (got - base).abs().max() > 1e-3, f"{name} changes nothing: the test would be vacuous"
    # every parameter: same names, values, dtypes and requires_grad; every per-adapter setting
    ref_params = dict(ref.named_parameters())
    fast_params = dict(fast.named_parameters())
    assert fast_params.keys() == ref_params.keys()
    for n, p in ref_params.items():
        q = fast_params[n]
        assert (q.dtype, q.device, q.requires_grad) == (p.dtype, p.device, p.requires_grad), n
        torch.testing.assert_close(q, p, rtol=0, atol=0)
    for (n, m), (_, r) in zip(fast.named_modules(), ref.named_modules()):
        if isinstance(r, LoraLayer):
            for attr in ("r", "lora_alpha", "scaling", "use_rslora", "use_dora", "lora_bias"):
                assert getattr(m, attr) == getattr(r, attr), (n, attr)
            assert {k: type(v) for k, v in m.lora_dropout.items()} == \
                   {k: type(v) for k, v in r.lora_dropout.items()}, n
    for name in PLAIN:
        assert fast.peft_config[name].to_dict() == ref.peft_config[name].to_dict()


def test_requires_grad_and_active_adapter(tiny_llama_dir, folders):
    fast, _ = _two_models(tiny_llama_dir, folders)
    ll.load_adapter(fast, folders["r8_a32"], name="frozen", activate=False)
    assert fast.active_adapter == "first"
    ll.load_adapter(fast, folders["rs_r2"], name="tuned", trainable=True, activate=False)
    flags = {n: p.requires_grad for n, p in fast.named_parameters() if ".lora_" in n}
    assert not any(f for n, f in flags.items() if ".frozen." in n)
    assert all(f for n, f in flags.items() if ".tuned." in n)
    assert fast.peft_config["frozen"].inference_mode
    assert not fast.peft_config["tuned"].inference_mode
    assert fast.active_adapter == "first"
    with fast.disable_adapter():
        base = logits(fast)
    ll.set_adapter(fast, "first")
    first = logits(fast)
    assert (first - base).abs().max() > 1e-3      # still routed through "first"
    assert not any(p.requires_grad for n, p in fast.named_parameters() if ".lora_" not in n)


@pytest.mark.parametrize("name", list(PLAIN))
def test_save_round_trip(tiny_llama_dir, folders, tmp_path, name):
    fast, _ = _two_models(tiny_llama_dir, folders)
    before = _counts()["fast"]
    ll.load_adapter(fast, folders[name], name=name)
    assert _counts()["fast"] == before + 1
    out = ll.save_adapter(fast, tmp_path / "again", adapter=name)
    want = load_file(folders[name] / "adapter_model.safetensors")
    got = load_file(out / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("first,name", [("first", "dora"), ("qv_only", "r8_a32")])
def test_fallback_to_peft(tiny_llama_dir, folders, first, name):
    """DoRA, and adapters on modules that are not LoRA layers yet, take peft's path (and agree)."""
    fast, ref = _two_models(tiny_llama_dir, folders, first=first)
    before = _counts()
    ll.load_adapter(fast, folders[name], name=name)
    assert _counts()["peft"] == before["peft"] + 1 and _counts()["fast"] == before["fast"]
    ref.load_adapter(str(folders[name]), adapter_name=name)
    ref.set_adapter(name)
    torch.testing.assert_close(logits(fast), logits(ref), rtol=1e-6, atol=1e-6)


def test_bf16_model_keeps_peft_dtypes(tiny_llama_dir, folders):
    """On a bf16 base peft upcasts adapters to fp32; the fast path must do the same."""
    def load(path, name, model=None):
        model = model if model is not None else ll.load_model(tiny_llama_dir, device="cpu",
                                                              dtype=torch.bfloat16)[0]
        return ll.load_adapter(model, path, name=name)
    fast = load(folders["first"], "first")
    ref = _peft_load(ll.load_model(tiny_llama_dir, device="cpu", dtype=torch.bfloat16)[0],
                     folders["first"], "first")
    before = _counts()["fast"]
    fast = load(folders["rs_r2"], "rs", fast)
    assert _counts()["fast"] == before + 1
    ref.load_adapter(str(folders["rs_r2"]), adapter_name="rs")
    ref.set_adapter("rs")
    for (n, p), (_, q) in zip(fast.named_parameters(), ref.named_parameters()):
        assert p.dtype == q.dtype and p.requires_grad == q.requires_grad, n
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    torch.testing.assert_close(logits(fast), logits(ref), rtol=1e-5, atol=1e-5)


def test_shape_check_lookup_equals_inspect_model(tiny_llama_dir, folders):
    """The by-name lookup behind the shape check agrees with inspect_model's table, with and
    without adapters (wrapped layers, their base_layer and lora_* insides, the LM head)."""
    model = ll.load_model(tiny_llama_dir, device="cpu")[0]
    for stage in ("plain", "qv_only", "first"):
        if stage != "plain":
            model = ll.load_adapter(model, folders[stage], name=stage)
        table = ll.inspect_model(model).set_index("name")
        names = {n.removeprefix("base_model.model.") for n, _ in model.named_modules()}
        names |= {"lm_head", "model.layers.9.self_attn.q_proj", "nope", ""}
        assert set(table.index) < names
        for n in names:
            want = ((int(table.at[n, "in_features"]), int(table.at[n, "out_features"]))
                    if n in table.index else None)
            assert adapter_io._linear_features(model, n) == want, (stage, n)


def test_mismatched_base_is_refused_before_either_path(tiny_llama_dir, folders, tmp_path):
    """An adapter saved from a wider model is refused with the shapes named, model unchanged."""
    from transformers import LlamaConfig, LlamaForCausalLM

    wide = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2))
    wide_pm = ll.attach(wide, ll.AdapterSpec(r=2), name="wide")
    path = ll.save_adapter(wide_pm, tmp_path / "wide", adapter="wide")
    fast, _ = _two_models(tiny_llama_dir, folders)
    with pytest.raises(ll.errors.AdapterMismatchError, match=r"saved \(2, 32\)"):
        ll.load_adapter(fast, path, name="wide")
    assert set(fast.peft_config) == {"first"}


def test_fast_path_on_nf4_base_equals_peft(tiny_llama_dir, folders):
    """QLoRA: on a 4-bit base the LoRA layers are bitsandbytes wrappers; the result matches."""
    def base():
        return ll.load_model(tiny_llama_dir, quant="nf4", device="cpu")[0]
    fast = ll.load_adapter(base(), folders["first"], name="first")
    ref = _peft_load(base(), folders["first"], "first")
    before = _counts()["fast"]
    fast = ll.load_adapter(fast, folders["r8_a32"], name="r8")
    assert _counts()["fast"] == before + 1
    ref.load_adapter(str(folders["r8_a32"]), adapter_name="r8")
    ref.set_adapter("r8")
    for (n, p), (_, q) in zip(fast.named_parameters(), ref.named_parameters()):
        if ".lora_" in n:
            assert p.dtype == q.dtype and p.requires_grad == q.requires_grad, n
            torch.testing.assert_close(p, q, rtol=0, atol=0)
    torch.testing.assert_close(logits(fast), logits(ref), rtol=1e-5, atol=1e-5)


def test_failed_fast_load_leaves_model_unchanged(tiny_llama_dir, folders):
    """A name torch refuses as a module key ("train") fails inside update_layer on the first layer;
    the half-added adapter is removed again and the model still works as before.  (load_adapter
    refuses such names up front now, so the fast path is called directly to fail midway.)"""
    from lora_lab.hf.adapters.io import _fast_load

    fast, _ = _two_models(tiny_llama_dir, folders)
    want = logits(fast)
    with pytest.raises(ll.errors.AdapterError, match="torch modules"):
        ll.load_adapter(fast, folders["r8_a32"], name="train")
    with pytest.raises(KeyError):
        _fast_load(fast, Path(folders["r8_a32"]), "train", False)
    assert set(fast.peft_config) == {"first"}
    assert not any("train" in m.r for m in fast.modules() if isinstance(m, LoraLayer))
    torch.testing.assert_close(logits(fast), want, rtol=0, atol=0)
    ll.load_adapter(fast, folders["r8_a32"], name="r8")
    assert set(fast.peft_config) == {"first", "r8"}
