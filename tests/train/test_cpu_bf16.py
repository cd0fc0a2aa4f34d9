"""bf16 on CPUs that have it (issue 22): the rule, what a run says it used, and that a bf16-autocast
step computes the fp32 loss to within bf16's rounding while the adapter stays fp32."""

from __future__ import annotations

import platform

import pytest
import torch
from safetensors.torch import load_file

import lora_lab as ll
from lora_lab.hf.model import device as dev
from lora_lab.train.loop import train


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(platform.system() != "Linux", reason="reads /proc/cpuinfo")
def test_native_bf16_is_what_the_cpu_flags_say():
    """Oracle: the kernel's CPU flags (x86 avx512_bf16 / amx_bf16, Arm bf16)."""
    flags = _cpu_flags()
    assert dev.cpu_bf16_native() == bool(flags & {"avx512_bf16", "amx_bf16", "amx_tile", "bf16"})


@pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64",
                    reason="reads x86 flags from /proc/cpuinfo")
def test_torch_takes_bf16_to_onednn_where_the_cpu_flags_say():
    """Oracle: the CPU flags against what ATen's mkldnn_bf16_device_check asks oneDNN for (its error
    text: "needs the cpu support avx_ne_convert or avx512bw, avx512vl and avx512dq"), or native bf16."""
    flags = _cpu_flags()
    want = dev.cpu_bf16_native() or {"avx512bw", "avx512vl", "avx512dq"} <= flags or "avx_ne_convert" in flags
    assert dev.cpu_bf16_onednn() == want
    assert (torch.bfloat16 in dev.emulated_dtypes()) == (not want)


def test_the_cpu_rule_needs_the_chip_and_a_wide_enough_model(monkeypatch):
    monkeypatch.setattr(dev, "cpu_bf16_native", lambda: True)
    assert dev.default_train_precision("cpu", 576) == "bf16"  # SmolLM2-135M: ~1.7x fp32
    assert dev.default_train_precision("cpu", 128) == "fp32"  # builtin:tiny: slower in bf16
    assert dev.auto_dtype("cpu", 576) == torch.bfloat16 and dev.auto_dtype("cpu", 64) == torch.float32
    assert dev.as_dtype("auto", "cpu", 576) == torch.bfloat16
    monkeypatch.setattr(dev, "cpu_bf16_native", lambda: False)
    assert dev.default_train_precision("cpu", 576) == "fp32"
    assert dev.auto_dtype("cpu", 576) == torch.float32


def _rows(tok):
    from conftest import token_rows  # noqa: E402  (tests/train/conftest.py)

    return token_rows(tok, n=8)


def _run(model_dir, tok_rows, tmp_path, precision, name):
    model, tok = ll.load_model(model_dir, device="cpu")
    torch.manual_seed(0)
    model = ll.attach(model, ll.AdapterSpec(r=4, target_modules="all-linear"))
    spec = ll.TrainSpec(steps=2, batch_size=8, lr=1e-2, schedule="constant", precision=precision,
                        output_dir=str(tmp_path / name))
    states = []

    class Keep(ll.Callback):
        def on_step(self, state, control):
            states.append(state)

    return model, train(model, tok, tok_rows, spec=spec, callbacks=[Keep()]), states


def test_a_small_model_trains_in_fp32_under_auto(tiny_llama_dir, tmp_path, one_thread):
    _, tok = ll.load_model(tiny_llama_dir, device="cpu")
    _, res, states = _run(tiny_llama_dir, _rows(tok), tmp_path, "auto", "auto")
    assert res.final["precision"] == "fp32" and states[-1].precision == "fp32"  # hidden 64 < 512


def test_bf16_autocast_step_matches_fp32_loss_and_the_adapter_stays_fp32(tiny_llama_dir, tmp_path,
                                                                          one_thread, bf16_path):
    """Step 1's loss is computed before any update, so fp32 and bf16 runs see the same weights;
    the difference is bf16's rounding (8-bit mantissa: 2⁻⁸ ≈ 0.4% per product).  Measured on the
    tiny Llama: |Δloss|/loss = 4.9e-5 (step 1); tolerance 5e-3."""
    _, tok = ll.load_model(tiny_llama_dir, device="cpu")
    rows = _rows(tok)
    _, fp32, _ = _run(tiny_llama_dir, rows, tmp_path, "fp32", "fp32")
    model, bf16, states = _run(tiny_llama_dir, rows, tmp_path, "bf16", "bf16")
    assert fp32.final["precision"] == "fp32"
    assert bf16.final["precision"] == "bf16 autocast" and states[0].precision == "bf16 autocast"
    l32, l16 = fp32.loss.iloc[0], bf16.loss.iloc[0]
    assert l16 != l32  # autocast really ran in bf16
    assert abs(l16 - l32) / l32 < 5e-3
    assert bf16.loss.iloc[1] < l16  # and it trained
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    saved = load_file(f"{bf16.adapter_path}/adapter_model.safetensors")
    assert saved and all(t.dtype == torch.float32 for t in saved.values())


def test_auto_picks_bf16_autocast_where_the_rule_says_so(tiny_llama_dir, tmp_path, one_thread,
                                                        monkeypatch):
    """The wiring from TrainSpec(precision="auto") and load_model(dtype="auto") to the rule: with
    the rule made to say bf16 for this model, the run autocasts and the base loads in bf16, its
    4-bit layers computing in bf16."""
    monkeypatch.setattr(dev, "cpu_bf16_native", lambda: True)
    monkeypatch.setattr(dev, "CPU_BF16_MIN_HIDDEN", 64)
    _, tok = ll.load_model(tiny_llama_dir, device="cpu")
    _, res, states = _run(tiny_llama_dir, _rows(tok), tmp_path, "auto", "auto")
    assert res.final["precision"] == "bf16 autocast" and states[-1].precision == "bf16 autocast"
    base, _ = ll.load_model(tiny_llama_dir, device="cpu", dtype="auto")
    assert base.dtype == torch.bfloat16
    q, _ = ll.load_model(tiny_llama_dir, "nf4", device="cpu", dtype="auto")
    assert q.config.quantization_config.bnb_4bit_compute_dtype == torch.bfloat16


def test_a_cpu_without_native_bf16_refuses_bf16_matrix_products(tiny_llama_dir, tmp_path, one_thread,
                                                                 monkeypatch):
    """Where bf16 is emulated (measured 30-350x slower than fp32 on an AMD EPYC Zen 3), train()
    refuses, before any step, bf16 autocast, a base loaded in bf16 and 4-bit layers computing in
    bf16, each with its fix; load_model warns when it loads such a base; "auto" trains in fp32.  (The
    chip check is made to say "no native bf16 and no oneDNN path": an AVX2-only CPU such as that one.)"""
    monkeypatch.setattr(dev, "cpu_bf16_native", lambda: False)
    monkeypatch.setattr(dev, "cpu_bf16_onednn", lambda: False)
    _, tok = ll.load_model(tiny_llama_dir, device="cpu")
    rows = _rows(tok)
    with pytest.raises(ll.TrainingError, match="native bf16") as err:
        _run(tiny_llama_dir, rows, tmp_path, "bf16", "bf16")
    assert "precision='auto'" in err.value.fix
    assert not list(tmp_path.glob("bf16/checkpoint-*"))  # refused before any step
    from conftest import assert_half_bases_refused  # noqa: E402  (tests/train/conftest.py)

    spec = ll.TrainSpec(steps=1, batch_size=8, output_dir=str(tmp_path / "base"))
    model = assert_half_bases_refused(tiny_llama_dir, tok, rows, spec, "bf16")
    _, res, _ = _run(tiny_llama_dir, rows, tmp_path, "auto", "auto")
    assert res.final["precision"] == "fp32"
    monkeypatch.setattr(dev, "cpu_bf16_onednn", lambda: True)  # where oneDNN takes bf16 (AVX512), it trains
    assert len(train(model, tok, rows, spec=spec.replace(output_dir=str(tmp_path / "onednn"))).loss) == 1
    monkeypatch.setattr(dev, "cpu_bf16_native", lambda: True)  # where bf16 is native, the same model trains
    assert len(train(model, tok, rows, spec=spec.replace(output_dir=str(tmp_path / "native"))).loss) == 1


def _compute_dtypes(model):
    import bitsandbytes as bnb

    return {m.compute_dtype for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)}


@pytest.mark.parametrize("native", [True, False])
def test_qlora_compute_dtype_follows_the_rule_by_default(tiny_llama_dir, one_thread, monkeypatch, native):
    """With no dtype asked, a 4-bit base's layers compute in what the rule says for this model
    (oracle: device.auto_dtype, the rule's own function), while its unquantized parts stay fp32;
    dtype="fp32" and QuantSpec(compute_dtype=...) still force their dtype."""
    monkeypatch.setattr(dev, "cpu_bf16_native", lambda: native)
    monkeypatch.setattr(dev, "CPU_BF16_MIN_HIDDEN", 64)
    want = dev.auto_dtype("cpu", 64)
    assert want == (torch.bfloat16 if native else torch.float32)
    q, _ = ll.load_model(tiny_llama_dir, "nf4", device="cpu")
    assert q.config.quantization_config.bnb_4bit_compute_dtype == want
    assert _compute_dtypes(q) == {want} and q.lm_head.weight.dtype == torch.float32
    forced, _ = ll.load_model(tiny_llama_dir, "nf4", device="cpu", dtype="fp32")
    assert _compute_dtypes(forced) == {torch.float32}
    spec = ll.QuantSpec(compute_dtype="float32")
    assert _compute_dtypes(ll.load_model(tiny_llama_dir, spec, device="cpu")[0]) == {torch.float32}
    monkeypatch.setattr(dev, "CPU_BF16_MIN_HIDDEN", 512)  # the real threshold: the tiny Llama is too narrow
    assert _compute_dtypes(ll.load_model(tiny_llama_dir, "nf4", device="cpu")[0]) == {torch.float32}


def test_a_bf16_base_evaluates_like_the_fp32_one(tiny_llama_dir, one_thread):
    """Logits of the base loaded with dtype="bf16" against fp32 (transformers' own forward):
    measured relative error 5.7e-3 on the tiny Llama; tolerance 3e-2."""
    m32, tok = ll.load_model(tiny_llama_dir, device="cpu")
    m16, _ = ll.load_model(tiny_llama_dir, device="cpu", dtype="bf16")
    ids = torch.tensor([tok("abcabcabc xyzxyz")["input_ids"]])
    with torch.no_grad():
        a, b = m32(ids).logits, m16(ids).logits.float()
    assert float((a - b).norm() / a.norm()) < 3e-2


def test_info_says_what_auto_trains_in():
    from lora_lab.cli import info_lines

    line = next(x for x in info_lines() if x.startswith("training"))
    picked = dev.default_train_precision(dev.default_device())
    assert (picked if picked == "fp32" else f"{picked} autocast") in line
    assert any(x.startswith("CPU bf16") and ("native" in x) == dev.cpu_bf16_native() for x in info_lines())
