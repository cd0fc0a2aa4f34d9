"""attach, counts, save/load, switching, disabling, merging: against real peft, with oracles."""

import pytest
import torch

import lora_lab as ll
from lora_lab.errors import (AdapterError, AdapterMismatchError, LoraLabError, MergeError,
                             TargetModuleError)

IDS = torch.randint(4, 90, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def randomize_lora(model, adapter, seed=0):
    """Give B non-zero values so the adapter changes outputs (B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f"lora_B.{adapter}." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("spec", [
    ll.AdapterSpec(r=4), ll.AdapterSpec(r=8, target_modules="attention-qv"),
    ll.AdapterSpec(r=2, layers=(1,)), ll.AdapterSpec(r=3, target_modules=("gate_proj", "down_proj")),
])
def test_lora_parameter_count_equals_formula(tiny_llama, spec):
    model, _ = tiny_llama
    table = ll.inspect_model(model)
    sel = table if spec.target_modules == "all-linear" else table[table.module_type.isin(spec.target_modules)]
    if spec.layers:
        sel = sel[sel.layer.isin(spec.layers)]
    expected = int((spec.r * (sel.in_features + sel.out_features)).sum())
    total_before = ll.count_parameters(model).total
    pm = ll.attach(model, spec)
    c = ll.count_parameters(pm)
    assert c.trainable == expected
    assert c.total == total_before + expected
    assert c.percent == pytest.approx(100 * expected / c.total)


def test_count_on_4bit_base_counts_logical_parameters(tiny_llama_dir, tiny_llama_nf4):
    full, _ = ll.load_model(tiny_llama_dir)
    q, _ = tiny_llama_nf4
    assert ll.count_parameters(q).total == ll.count_parameters(full).total


def test_adapter_bytes_match_the_saved_file(tiny_llama, tmp_path):
    model, _ = tiny_llama
    pm = ll.attach(model, ll.AdapterSpec(r=4))
    path = ll.save_adapter(pm, tmp_path / "a")
    size = (path / "adapter_model.safetensors").stat().st_size
    est = ll.count_parameters(pm).adapter_bytes
    assert est <= size <= est + 16 * 1024  # payload plus the safetensors JSON header


def test_merged_weight_equals_w_plus_sBA(tiny_llama):
    model, _ = tiny_llama
    W = model.model.layers[1].mlp.up_proj.weight.detach().clone()
    pm = ll.attach(model, ll.AdapterSpec(r=4, alpha=12))
    randomize_lora(pm, "default")
    f = next(x for x in ll.lora_factors(pm) if x.name == "model.layers.1.mlp.up_proj")
    assert f.scaling == 3.0 and f.A.shape == (4, W.shape[1]) and f.B.shape == (W.shape[0], 4)
    before = logits(pm)
    ll.merge_adapter(pm)
    merged = pm.base_model.model.model.layers[1].mlp.up_proj.base_layer.weight
    torch.testing.assert_close(merged, W + 3.0 * f.B @ f.A, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits(pm), before, rtol=1e-4, atol=1e-4)
    ll.unmerge_adapter(pm)
    torch.testing.assert_close(pm.base_model.model.model.layers[1].mlp.up_proj.base_layer.weight,
                               W, rtol=0, atol=1e-5)


def test_save_load_round_trip_gives_identical_outputs(tiny_llama_dir, tmp_path):
    model, _ = ll.load_model(tiny_llama_dir)
    spec = ll.AdapterSpec(r=4, alpha=8, target_modules="attention", use_rslora=True)
    pm = ll.attach(model, spec)
    randomize_lora(pm, "default")
    ref = logits(pm)
    path = ll.save_adapter(pm, tmp_path / "ad")
    assert (path / "adapter_model.safetensors").exists() and not list(path.glob("*.bin"))
    base2, _ = ll.load_model(tiny_llama_dir)
    pm2 = ll.load_adapter(base2, path)
    torch.testing.assert_close(logits(pm2), ref)
    assert pm2.lora_lab_specs["default"] == spec
    # saving again over the same folder replaces it atomically and leaves no temp folders
    ll.save_adapter(pm, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]


def test_load_onto_wrong_base_names_shapes(tiny_llama, tmp_path):
    model, _ = tiny_llama
    pm = ll.attach(model, ll.AdapterSpec(r=2))
    path = ll.save_adapter(pm, tmp_path / "ad")
    other, _ = ll.load_model("builtin:tiny-random")  # hidden 128, not 64
    with pytest.raises(AdapterMismatchError, match=r"saved \(2, 64\)"):
        ll.load_adapter(other, path)


def test_load_refuses_pickles_and_non_adapters(tiny_llama, tmp_path):
    model, _ = tiny_llama
    with pytest.raises(AdapterError, match="adapter_config.json"):
        ll.load_adapter(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"x")
    with pytest.raises(AdapterError, match="never unpickles"):
        ll.load_adapter(model, tmp_path)


def test_switching_and_disabling(tiny_llama_dir, tiny_llama, tmp_path):
    model, _ = tiny_llama
    base = logits(model)
    pm = ll.attach(model, ll.AdapterSpec(r=4), name="add")
    randomize_lora(pm, "add", seed=1)
    pm = ll.attach(pm, ll.AdapterSpec(r=2, target_modules="mlp"), name="sub")
    randomize_lora(pm, "sub", seed=2)
    ll.set_adapter(pm, "add")
    out_a = logits(pm)
    ll.set_adapter(pm, "sub")
    out_b = logits(pm)
    assert not torch.allclose(out_a, out_b) and not torch.allclose(out_a, base)
    # each equals the adapter loaded alone
    ll.save_adapter(pm, tmp_path / "sub", adapter="sub")
    alone, _ = ll.load_model(tiny_llama_dir)
    torch.testing.assert_close(logits(ll.load_adapter(alone, tmp_path / "sub")), out_b)
    with ll.disabled_adapters(pm):
        assert torch.equal(logits(pm), base)
    ll.set_adapter(pm, None)
    assert torch.equal(logits(pm), base) and ll.active_adapter(pm) is None
    ll.set_adapter(pm, "add")
    torch.testing.assert_close(logits(pm), out_a)
    table = ll.list_adapters(pm)
    assert list(table.name) == ["add", "sub"] and table.set_index("name").at["add", "active"]
    assert table.set_index("name").at["sub", "modules"] == 3 * model.config.num_hidden_layers
    ll.delete_adapter(pm, "sub")
    assert list(pm.peft_config) == ["add"]
    with pytest.raises(AdapterError, match="only adapter"):
        ll.delete_adapter(pm, "add")
    with pytest.raises(AdapterError, match="no adapter named"):
        ll.set_adapter(pm, "zzz")


def test_attach_validates_against_the_model(tiny_llama):
    model, _ = tiny_llama
    with pytest.raises(TargetModuleError, match=r"(?s)does not have.*q_proj"):
        ll.attach(model, ll.AdapterSpec(target_modules=("query_key_value",)))
    with pytest.raises(TargetModuleError, match=r"r <= 32"):
        ll.attach(model, ll.AdapterSpec(r=33, target_modules="attention-qv"))
    with pytest.raises(TargetModuleError, match=r"layers \[7\]"):
        ll.attach(model, ll.AdapterSpec(layers=(7,)))
    pm = ll.attach(model, ll.AdapterSpec(r=2))
    with pytest.raises(AdapterError, match="already has an adapter"):
        ll.attach(pm, ll.AdapterSpec(r=2))
    with pytest.raises(LoraLabError, match="cannot share"):
        ll.attach(pm, ll.AdapterSpec(method="prompt"), name="soft")


@pytest.mark.parametrize("spec", [ll.AdapterSpec(method="prefix", num_virtual_tokens=4),
                                  ll.AdapterSpec(method="prompt", num_virtual_tokens=4),
                                  ll.AdapterSpec(method="ia3"),
                                  ll.AdapterSpec(r=2, use_dora=True)])
def test_other_methods_attach_and_run(tiny_llama, spec):
    model, _ = tiny_llama
    pm = ll.attach(model, spec)
    c = ll.count_parameters(pm)
    assert 0 < c.trainable < c.total
    out = pm(input_ids=IDS, labels=IDS)
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for p in pm.parameters() if p.requires_grad)


def test_qlora_nf4_trains_and_loss_falls(tiny_llama_nf4):
    model, _ = tiny_llama_nf4
    pm = ll.attach(model, ll.AdapterSpec(r=8))
    assert not pm.is_gradient_checkpointing  # a visible choice, off unless asked for
    assert all(type(m).__name__ != "Linear" or not m.weight.requires_grad
               for n, m in pm.named_modules() if "lora" not in n)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(4, 90, (4, 16), generator=torch.Generator().manual_seed(3))
    pm.train()
    losses = []
    for _ in range(5):
        loss = pm(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_4bit_merge_in_place_is_refused_and_merged_copy_is_right(tiny_llama_dir, tiny_llama_nf4,
                                                                  tmp_path):
    model, _ = tiny_llama_nf4
    pm = ll.attach(model, ll.AdapterSpec(r=4))
    randomize_lora(pm, "default")
    with pytest.raises(MergeError, match="merged_copy"):
        ll.merge_adapter(pm)
    qlogits = logits(pm)
    merged, report = ll.merged_copy(pm, probe_ids=IDS)
    assert report.from_quantized and type(merged).__name__ == "LlamaForCausalLM"
    assert all(type(m).__name__ != "Linear4bit" for m in merged.modules())
    out = logits(merged)
    rel = float((out - qlogits).norm() / qlogits.norm())
    assert rel == pytest.approx(report.rel_logit_diff, rel=1e-4)
    assert 0 < rel < 0.3  # only the NF4 quantization gap separates them
    # oracle: the merged model equals the full-precision base carrying the same adapter, unmerged
    full, _ = ll.load_model(tiny_llama_dir)
    unmerged = ll.load_adapter(full, ll.save_adapter(pm, tmp_path / "q"))
    torch.testing.assert_close(out, logits(unmerged), rtol=1e-4, atol=1e-4)
    # the QLoRA model itself is untouched.  (bitsandbytes' CPU 4-bit kernels switch weight layout
    # between the first eval forward and a state_dict() call, which moves logits by ~1e-3 relative,
    # so this compares relatively rather than bit for bit.)
    after = logits(pm)
    assert float((after - qlogits).norm() / qlogits.norm()) < 5e-3


def test_merged_copy_full_precision_is_exact(tiny_llama):
    model, _ = tiny_llama
    pm = ll.attach(model, ll.AdapterSpec(r=4))
    randomize_lora(pm, "default")
    merged, report = ll.merged_copy(pm)
    assert report.rel_logit_diff < 1e-5 and not report.from_quantized
    torch.testing.assert_close(logits(merged), logits(pm), rtol=1e-4, atol=1e-4)


def test_lora_factors_on_a_4bit_base(tiny_llama_nf4):
    model, _ = tiny_llama_nf4
    pm = ll.attach(model, ll.AdapterSpec(r=4, alpha=4, target_modules="attention-qv"))
    randomize_lora(pm, "default")
    fs = list(ll.lora_factors(pm))
    assert len(fs) == 2 * model.config.num_hidden_layers
    cfg = model.config
    for f in fs:
        out = cfg.hidden_size if f.module_type == "q_proj" else \
            cfg.num_key_value_heads * cfg.hidden_size // cfg.num_attention_heads
        assert f.shape == (out, cfg.hidden_size) and f.scaling == 1.0 and f.r == 4
        assert f.A.dtype == torch.float32 and f.delta().abs().sum() > 0
    with pytest.raises(AdapterError, match="No LoRA module"):
        list(ll.lora_factors(pm, "missing"))


@pytest.mark.gpu
def test_cuda_compute_dtype_follows_the_device(tiny_llama_dir):
    model, _ = ll.load_model(tiny_llama_dir, quant="nf4", device="cuda")
    want = torch.bfloat16 if torch.cuda.get_device_capability()[0] >= 8 else torch.float16  # T4: fp16
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.compute_dtype == want


@pytest.mark.parametrize("name", ["half", "train", "keys", "a.b", ""])
def test_adapter_names_peft_cannot_store_are_refused_with_a_fix(tiny_llama, name):
    model, _ = tiny_llama
    with pytest.raises(AdapterError, match="Fix: pass a short name"):
        ll.attach(model, ll.AdapterSpec(r=2), name=name)
    pm = ll.attach(model, ll.AdapterSpec(r=2), name="ok")  # the model is still usable
    assert ll.active_adapter(pm) == "ok"
