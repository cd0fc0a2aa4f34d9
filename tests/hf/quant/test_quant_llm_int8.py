"""``int8`` is LLM.int8(), what ``load_model(quant="int8")`` builds; ``int8-blockwise`` is
bitsandbytes' blockwise 8-bit.  Oracles: the int8 weights of a real ``load_model(quant="int8")``
model (transformers + bitsandbytes' ``Int8Params``), its logits, and bitsandbytes' own functions."""

from __future__ import annotations

import pytest
import torch

import lora_lab as ll
from lora_lab.errors import LoraLabError
from lora_lab.hf.quant import roundtrip as hq
from lora_lab.hf.quant import scan as hs
from lora_lab.hf.quant.output import quantized_output_error

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tiny_llama_dir):
    fp, tok = ll.load_model(tiny_llama_dir, device="cpu")
    q8, _ = ll.load_model(tiny_llama_dir, quant="int8", device="cpu")
    return fp.eval(), q8.eval(), tok


def _int8_weights(q8) -> dict[str, torch.Tensor]:
    """What the real int8 model computes with: CB · SCB / 127 per row of each Linear8bitLt."""
    import bitsandbytes.functional as F

    out = {}
    for name, m in q8.named_modules():
        if type(m).__name__ == "Linear8bitLt":
            scb = m.weight.SCB if m.weight.SCB is not None else m.state.SCB
            out[name + ".weight"] = F.int8_vectorwise_dequant(m.weight.data, scb)
    return out


def test_int8_round_trip_is_the_weight_of_a_real_int8_load(models):
    fp, q8, _ = models
    real = _int8_weights(q8)
    params = dict(fp.named_parameters())
    assert len(real) == 14
    rt = hq.roundtrip("int8")
    for name, w_int8 in real.items():
        assert torch.equal(rt(params[name].detach()), w_int8), name     # bit for bit
    scan = hs.scan_quantization(fp, schemes=("int8",), progress=False)
    for row in scan.table.itertuples():
        W = params[row.name].detach()
        want = ((W - real[row.name]).norm() / W.norm()).item()
        assert row.rel_error == pytest.approx(want, rel=1e-5)
        # one fp32 absmax per row, as LLM.int8() stores it (and core/memory.int8_bytes counts it)
        assert (row.blocksize, row.double_quant) == (row.in_features, False)
        assert row.bits_per_param == pytest.approx(8 + 32 / row.in_features)


def test_int8_output_error_is_that_of_the_real_int8_model(models):
    """The LLM.int8() matmul also rounds the layer inputs: a weight round trip alone misses it."""
    fp, q8, _ = models
    ids = torch.randint(4, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in fp.state_dict().items()}
    with torch.no_grad():
        z = fp(ids).logits.reshape(-1, fp.config.vocab_size)
        zq = q8(ids).logits.reshape(-1, fp.config.vocab_size)
    logp, logq = torch.log_softmax(z, -1), torch.log_softmax(zq, -1)
    real_kl = (logp.exp() * (logp - logq)).sum(-1).mean().item()
    real_mae = (z - zq).abs().mean().item()
    sim = quantized_output_error(fp, ids, "int8", per_layer=True)
    assert sim.kl == pytest.approx(real_kl, rel=1e-4) and sim.kl > 0
    assert sim.logits_mae == pytest.approx(real_mae, rel=1e-5)
    assert sim.scheme == "int8" and "LLM.int8()" in repr(sim)
    assert sim.top1_agreement == pytest.approx((z.argmax(-1) == zq.argmax(-1)).float().mean().item())
    t = sim.table.set_index("variant")
    assert list(t.index) == ["quantized", "layer 0", "layer 1"]
    assert (t.loc[["layer 0", "layer 1"], "kl"] < sim.kl).all()
    blockwise = quantized_output_error(fp, ids, "int8-blockwise", per_layer=False)
    assert blockwise.kl != pytest.approx(real_kl, rel=0.1)      # another format, another error
    assert all(torch.equal(before[k], v) for k, v in fp.state_dict().items())   # restored


def test_int8_lowrank_rows_and_tokenizer_batches(models):
    fp, _, tok = models
    batch = tok(["hello world", "a longer second line here"], return_tensors="pt", padding=True)
    out = quantized_output_error(fp, batch, "llm.int8", per_layer=False, ranks=(8,),
                                 loftq_iters=1, scaling=1.0)
    assert out.scheme == "int8" and out.tokens == int(batch["attention_mask"].sum())
    t = out.table.set_index("variant")
    assert list(t.index) == ["quantized", "svd r8", "loftq r8"]
    assert t.loc["svd r8", "logits_mae"] < out.logits_mae


def test_scheme_names_and_the_blockwise_round_trip():
    import bitsandbytes.functional as F

    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(3))
    q, st = F.quantize_blockwise(w, blocksize=128)
    assert torch.equal(hq.roundtrip("int8-blockwise", 128)(w), F.dequantize_blockwise(q, st))
    assert torch.equal(hq.roundtrip("llm.int8")(w), hq.roundtrip("int8")(w))
    assert hq.quant_error(w, "llm.int8").scheme == "int8"
    scan = hs.scan_quantization({"model.layers.0.mlp.up_proj.weight": w},
                                schemes=("llm.int8", "int8", "int8-blockwise"), progress=False)
    assert scan.schemes == ("int8", "int8-blockwise") and "LLM.int8()" in scan.note
    assert len(hq.code_points("int8")) == 255 and len(hq.code_points("int8-blockwise")) == 256
    with pytest.raises(LoraLabError, match="int8-blockwise") as info:
        hq.quant_error(w, "int8_blockwise")
    assert "load_model(quant='int8')" in str(info.value)


def test_int8_round_trip_chunks_rows_and_keeps_dtype():
    w = torch.randn(300, 40, dtype=torch.float16, generator=torch.Generator().manual_seed(4))
    whole = hq.roundtrip("int8")(w)
    assert whole.dtype == torch.float16
    assert torch.equal(hq.roundtrip("int8", chunk=40 * 7)(w), whole)    # 7 rows per call
