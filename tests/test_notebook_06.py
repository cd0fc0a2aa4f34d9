"""Notebook 06 (memory planning) runs headless, and its numbers are estimate_memory's own.

The configs are written out again here from the published shapes (not read from the notebook), so a
typo in the notebook's table shows up as a mismatch with this oracle.
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
          "logits_share_128k", "logits_gib_128k", "crossovers", "ckpt_saving", "designer_need")


def _config(h, i, L, a, kv, V, tied):
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=L, num_attention_heads=a,
                       num_key_value_heads=kv, vocab_size=V, tie_word_embeddings=tied)


def _hand_params(h, i, L, a, kv, V, tied):
    d = h // a
    return V * h + L * (h * a * d + 2 * h * kv * d + a * d * h + 3 * h * i + 2 * h) + h + (0 if tied else V * h)


@pytest.mark.slow
def test_memory_planning_notebook_matches_estimate_memory(tmp_path):
    import lora_lab as ll

    values, nb = run_notebook("06_memory_planning.ipynb", PARAMS, cwd=tmp_path, probe=PROBES)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors

    spec = ll.AdapterSpec(r=PARAMS["RANK"], target_modules="all-linear")
    for name, shape in SHAPES.items():
        assert values["params"][name] == _hand_params(*shape), name
        assert values["params"][name] / 1e9 == pytest.approx(PUBLISHED_B[name], rel=0.005), name
        for dev in PARAMS["DEVICES"]:       # the oracle: estimate_memory called here, directly
            est = ll.estimate_memory(_config(*shape), spec, quant="nf4", batch_size=PARAMS["BATCH"],
                                     seq_len=PARAMS["SEQ_LEN"], device=dev,
                                     gradient_checkpointing=PARAMS["CHECKPOINTING"])
            assert values["verdicts"][name][dev] == est.verdicts(), (name, dev)
            for s in ("full FT", "LoRA", "QLoRA"):
                assert values["needs"][name][s] == round(est.need(s) / GIB, 3), (name, s)
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
