"""Notebook 06 (memory planning) runs headless; its numbers are checked against published sizes and
against bytes measured here, not only against ``estimate_memory`` itself.

The configs are written out again here from the published shapes (not read from the notebook), so a
typo in the notebook's table shows up as a mismatch.  Oracles from outside lora_lab:

* published parameter counts (Llama 3 paper and config.json, LLaMA paper) and the QLoRA paper's
  "65B under 48 GB";
* the same models built by plain transformers + peft on the meta device (shapes, no storage):
  their trainable LoRA parameters and the bytes of the adapter and of the frozen 16-bit base, with
  the gradient and AdamW-state bytes per parameter byte measured on a real (tiny) CPU step.  The
  notebook's need for each model must hold at least those measured bytes, and a device that cannot
  hold them must get "does not fit".
"""

import pytest
from notebook_runner import run_notebook

GIB = 2**30
# name: (hidden, intermediate, layers, heads, kv_heads, vocab, tied); Llama 3 paper Table 3 and the
# models' config.json; LLaMA paper Table 2 (65B) with its converted config's FFN width and vocab.
SHAPES = {
    "Llama-3.2-1B": (2048, 8192, 16, 32, 8, 128256, True),
    "Llama-3.1-8B": (4096, 14336, 32, 32, 8, 128256, False),
    "Llama-3.1-70B": (8192, 28672, 80, 64, 8, 128256, False),
    "LLaMA-65B": (8192, 22016, 80, 64, 64, 32000, False),
}
PUBLISHED_B = {"Llama-3.2-1B": 1.24, "Llama-3.1-8B": 8.03, "Llama-3.1-70B": 70.6, "LLaMA-65B": 65.2}
PARAMS = dict(SEQ_LEN=1024, BATCH=2, RANK=16, DEVICES=("T4", "L4", "A100-80GB"), OPTIMIZER="adamw",
              CHECKPOINTING=True)
PROBES = ("needs", "verdicts", "params", "qlora65_need", "qlora65_verdicts", "dq_saving_gb",
          "logits_share_128k", "logits_gib_128k", "crossovers", "ckpt_saving", "designer_need",
          "t4_longest")


def _config(h, i, L, a, kv, V, tied):
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=L, num_attention_heads=a,
                       num_key_value_heads=kv, vocab_size=V, tie_word_embeddings=tied)


def _hand_params(h, i, L, a, kv, V, tied):
    d = h // a
    layer = h * a * d + 2 * h * kv * d + a * d * h + 3 * h * i + 2 * h
    return V * h + L * layer + h + (0 if tied else V * h)


def _measured_lora(shape, rank: int) -> dict:
    """Plain transformers + peft (no lora_lab) on the meta device, fp16 base (a T4 has no bf16):
    trainable parameters, adapter bytes and frozen base bytes (a tied embedding counted once)."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_config(*shape), dtype=torch.float16)
        model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank,
                                                           target_modules="all-linear"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    return dict(params=sum(p.numel() for p in trainable),
                adapter=sum(p.numel() * p.element_size() for p in trainable),
                base=sum(p.numel() * p.element_size() for p in frozen))


def _measured_step_bytes() -> tuple[float, float]:
    """(gradient bytes, AdamW state bytes) per byte of trainable fp32 parameter, after one real
    backward and ``step`` of ``torch.optim.AdamW`` on CPU (measured: 1.0 and 2.0)."""
    import torch

    layer = torch.nn.Linear(16, 8)
    layer(torch.randn(4, 16)).square().mean().backward()
    opt = torch.optim.AdamW(layer.parameters())
    opt.step()
    params = sum(p.numel() * p.element_size() for p in layer.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in layer.parameters())
    states = sum(v.numel() * v.element_size() for st in opt.state.values()
                 for k, v in st.items() if k in ("exp_avg", "exp_avg_sq"))
    return grads / params, states / params


@pytest.mark.slow
def test_memory_planning_notebook_matches_estimate_memory(tmp_path):
    import lora_lab as ll

    values, nb = run_notebook("06_memory_planning.ipynb", PARAMS, cwd=tmp_path, probe=PROBES)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors

    spec = ll.AdapterSpec(r=PARAMS["RANK"], target_modules="all-linear")
    grad_per_byte, adamw_per_byte = _measured_step_bytes()
    assert (grad_per_byte, adamw_per_byte) == (1.0, 2.0)
    for name, shape in SHAPES.items():
        assert values["params"][name] == _hand_params(*shape), name
        assert values["params"][name] / 1e9 == pytest.approx(PUBLISHED_B[name], rel=0.005), name
        real = _measured_lora(shape, PARAMS["RANK"])
        # the fixed bytes of a LoRA step, measured: the frozen 16-bit base, the fp32 adapter, its
        # gradients and AdamW's two moments
        held = real["base"] + real["adapter"] * (1 + grad_per_byte + adamw_per_byte)
        for dev in PARAMS["DEVICES"]:       # the notebook shows what estimate_memory gives ...
            est = ll.estimate_memory(_config(*shape), spec, quant="nf4", batch_size=PARAMS["BATCH"],
                                     seq_len=PARAMS["SEQ_LEN"], device=dev,
                                     gradient_checkpointing=PARAMS["CHECKPOINTING"])
            assert values["verdicts"][name][dev] == est.verdicts(), (name, dev)
            if dev == PARAMS["DEVICES"][0]:      # the notebook's needs are those of its first device
                for s in ("full FT", "LoRA", "QLoRA"):
                    assert values["needs"][name][s] == round(est.need(s) / GIB, 3), (name, s)
            # ... and that agrees with the measured bytes
            assert est.trainable["LoRA"] == est.trainable["QLoRA"] == real["params"], name
            lora = est.scenarios["LoRA"]
            assert lora["base_weights"] == real["base"], name
            assert lora["adapter_weights"] == real["adapter"], name
            assert lora["gradients_total"] == real["adapter"] * grad_per_byte, name
            assert lora["optimizer_states"] == real["adapter"] * adamw_per_byte, name
            assert round(est.need("LoRA") / GIB, 3) >= round(held / GIB, 3), (name, dev)
            if held > est.device_bytes:
                assert values["verdicts"][name][dev]["LoRA"] == "does not fit", (name, dev)
    v = values["verdicts"]
    assert v["Llama-3.2-1B"]["T4"]["LoRA"] == "fits", v["Llama-3.2-1B"]
    assert v["Llama-3.1-8B"]["T4"]["full FT"] == "does not fit", v["Llama-3.1-8B"]
    assert v["Llama-3.1-70B"]["A100-80GB"]["LoRA"] == "does not fit", v["Llama-3.1-70B"]
    assert values["designer_need"] == values["needs"]["Llama-3.1-8B"]["QLoRA"]

    # QLoRA paper: 65B under 48 GB (r=64 all linear, paged AdamW, batch 1 x 512, checkpointing)
    est65 = ll.estimate_memory(_config(*SHAPES["LLaMA-65B"]), ll.AdapterSpec(r=64), "nf4", batch_size=1,
                               seq_len=512, optimizer="paged_adamw", device=48, gradient_checkpointing=True)
    assert values["qlora65_need"] == round(est65.need() / GIB, 3) < 48, values["qlora65_need"]
    assert est65.verdict("LoRA") == "does not fit"
    assert values["qlora65_verdicts"]["paged_adamw_8bit"] == "fits", values["qlora65_verdicts"]
    # QLoRA §3: double quantization saves 0.5 - 0.127 = 0.373 bit per parameter, "about 3 GB" at 65B
    quantized = values["params"]["LLaMA-65B"] - 2 * 32000 * 8192 - (2 * 80 + 1) * 8192
    assert values["dq_saving_gb"] == pytest.approx(0.373 * quantized / 8 / 1e9, rel=0.01)
    # logits of 4 x 2048 tokens at V = 128256 in bf16: T·V·12 bytes, most of the step
    assert values["logits_gib_128k"] == pytest.approx(4 * 2048 * 128256 * 12 / GIB, abs=1e-3)
    assert values["logits_share_128k"] > 0.5
    c = values["crossovers"]
    assert c["batch 1, checkpointing off"] < c["batch 1, checkpointing on"]
    assert c["batch 4, checkpointing on"] < c["batch 1, checkpointing on"]
    assert min(values["ckpt_saving"].values()) > 5, values["ckpt_saving"]

    # the longest sequence on the first device (T4), full vs chunked loss: it fits, 256 more does not
    spec = ll.AdapterSpec(r=PARAMS["RANK"], target_modules="all-linear")
    cfg1b = _config(*SHAPES["Llama-3.2-1B"])

    def fits(batch, seq, chunked):
        est = ll.estimate_memory(cfg1b, spec, batch_size=batch, seq_len=seq, device=PARAMS["DEVICES"][0],
                                 gradient_checkpointing=True, chunked_loss=chunked)
        return est.need("LoRA") <= est.device_bytes

    for batch in (1, 4):
        got = values["t4_longest"][f"batch {batch}"]
        full, chunked = got["full-vocabulary loss"], got["chunked loss (512 tokens)"]
        assert 0 < full < chunked, got
        for seq, on in ((full, False), (chunked, True)):
            assert fits(batch, seq, on) and not fits(batch, seq + 256, on), (batch, seq, on)
