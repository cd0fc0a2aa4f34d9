"""Attention in fp32 under CPU bf16 autocast (``lora_lab.hf.model.attention``).

Oracles: ``F.scaled_dot_product_attention`` on the upcast inputs in fp32, and transformers' own
``"sdpa"`` and ``"eager"`` attention on the fp32 model (padding mask included)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lora_lab as ll
from lora_lab.hf.model.attention import NAME, Fp32Attention, sdpa_fp32


def _tiny():
    model, _ = ll.load_model("builtin:tiny", device="cpu", dtype="fp32")
    return model.eval()


IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 8, 0, 0, 0]])
MASK = torch.tensor([[1] * 7, [1, 1, 1, 1, 0, 0, 0]])


def test_fp32_model_gives_transformers_logits(one_thread):
    model = _tiny()
    with torch.no_grad():
        sdpa = model(input_ids=IDS, attention_mask=MASK).logits
        with Fp32Attention(model, "cpu", torch.bfloat16) as attn:
            assert attn.active and model.config._attn_implementation == NAME
            ours = model(input_ids=IDS, attention_mask=MASK).logits
        assert model.config._attn_implementation == "sdpa"
        model.set_attn_implementation("eager")
        eager = model(input_ids=IDS, attention_mask=MASK).logits
    real = MASK.bool()
    torch.testing.assert_close(ours[real], sdpa[real], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours[real], eager[real], rtol=1e-5, atol=1e-5)


def test_under_bf16_autocast_it_is_fp32_attention_rounded_once():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 9, 16, generator=g).bfloat16().requires_grad_()
    k = torch.randn(2, 2, 9, 16, generator=g).bfloat16().requires_grad_()
    v = torch.randn(2, 2, 9, 16, generator=g).bfloat16().requires_grad_()
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = sdpa_fp32(module, q, k, v, None, scaling=0.25)
    ref = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(2, 1),
                                         v.float().repeat_interleave(2, 1), is_causal=True, scale=0.25)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 9, 4, 16)  # (B, T, H, D)
    torch.testing.assert_close(out, ref.transpose(1, 2).bfloat16(), rtol=0, atol=0)
    out.float().sum().backward()
    assert q.grad.dtype == torch.bfloat16 and k.grad.abs().sum() > 0


@pytest.mark.parametrize("device,dtype,impl", [
    ("cpu", torch.float32, "sdpa"), ("cpu", None, "sdpa"), ("cuda", torch.bfloat16, "sdpa"),
    ("cpu", torch.bfloat16, "eager")])
def test_inactive_elsewhere(device, dtype, impl):
    model = _tiny()
    model.set_attn_implementation(impl)
    with Fp32Attention(model, device, dtype) as attn:
        assert not attn.active and model.config._attn_implementation == impl


def test_restored_after_an_error_and_reported_by_train(tmp_path, one_thread, bf16_path):
    model = _tiny()
    with pytest.raises(ValueError), Fp32Attention(model, "cpu", torch.bfloat16):
        raise ValueError
    assert model.config._attn_implementation == "sdpa"

    model, tok = ll.load_model("builtin:tiny", device="cpu")
    model = ll.attach(model, ll.AdapterSpec(r=4))
    config = model.get_base_model().config
    rows = [{"prompt": "ab", "response": "cd"}] * 8

    class Seen(ll.Callback):
        def __init__(self):
            self.during = set()

        def on_step(self, state, control):
            self.during.add(config._attn_implementation)

    for precision, attention, during in (("bf16", "sdpa fp32", NAME), ("fp32", None, "sdpa")):
        seen = Seen()
        spec = ll.TrainSpec(steps=2, batch_size=4, precision=precision, output_dir=str(tmp_path / precision))
        result = ll.train(model, tok, rows, None, spec, callbacks=[seen])
        assert result.final["attention"] == attention and seen.during == {during}
        assert config._attn_implementation == "sdpa"
