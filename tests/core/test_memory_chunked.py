"""The planner's chunked-loss term: one chunk of logits instead of all, the rule of
``TrainSpec(chunked_loss="auto")``, and both numbers in the designer."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

import lora_lab as ll
from lora_lab.core import memory as mem
from lora_lab.errors import SpecError

ARCH = mem.Architecture(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, head_dim=64,
                        vocab=128_256, tied_embeddings=True)
LLAMA_1B = LlamaConfig(vocab_size=128_256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                       num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True)


def test_logits_term_is_one_chunk():
    assert mem.logits_bytes(ARCH, 4, 2048, 2) == 4 * 2048 * 128_256 * 12
    assert mem.logits_bytes(ARCH, 4, 2048, 2, chunk=512) == 512 * 128_256 * 12
    assert mem.logits_bytes(ARCH, 1, 100, 4, chunk=512) == mem.logits_bytes(ARCH, 1, 100, 4)  # T < C
    # a frozen head's fused chunk: the c-byte output, turned into its gradient in place one fp32
    # block of rows at a time (16 MiB: 32 rows of 128,256); in fp32 the block is the output itself
    assert mem.LOSS_BLOCK_BYTES // (4 * 128_256) == 32
    chunk = mem.logits_bytes(ARCH, 4, 2048, 2, chunk=512, frozen_head=True)
    assert chunk == 512 * 128_256 * 2 + 32 * 128_256 * 4
    assert mem.logits_bytes(ARCH, 1, 8, 2, chunk=512, frozen_head=True) == 8 * 128_256 * (2 + 4)  # one block
    assert mem.logits_bytes(ARCH, 4, 2048, 4, chunk=512, frozen_head=True) == 512 * 128_256 * 4
    assert mem.logits_bytes(ARCH, 4, 2048, 2, frozen_head=True) == 4 * 2048 * 128_256 * 12  # full loss


def test_auto_rule_and_defaults_match_trainspec():
    spec = ll.TrainSpec()
    assert spec.chunked_loss == "auto" and spec.loss_chunk_size == mem.DEFAULT_LOSS_CHUNK
    from lora_lab.hf.training.chunked_loss import AUTO_MIN_VOCAB, DEFAULT_CHUNK_SIZE
    assert (AUTO_MIN_VOCAB, DEFAULT_CHUNK_SIZE) == (mem.CHUNKED_LOSS_MIN_VOCAB, mem.DEFAULT_LOSS_CHUNK)
    assert mem.resolve_loss_chunk("auto", 128_256) == 512
    assert mem.resolve_loss_chunk("auto", 31_999) is None
    assert mem.resolve_loss_chunk(True, 100, 64) == 64 and mem.resolve_loss_chunk(False, 10**6) is None


def test_estimate_memory_models_the_chunked_loss():
    """Llama-3.2-1B LoRA, 4 × 2048 on a T4: the logits drop from 11.7 GiB to 0.14 GiB."""
    kw = dict(adapter=ll.AdapterSpec(r=16), batch_size=4, seq_len=2048, device="T4")
    full = ll.estimate_memory(LLAMA_1B, chunked_loss=False, **kw)
    chunked = ll.estimate_memory(LLAMA_1B, chunked_loss=True, **kw)
    auto = ll.estimate_memory(LLAMA_1B, chunked_loss="auto", **kw)
    assert ll.estimate_memory(LLAMA_1B, **kw).loss_chunk == 512  # TrainSpec's default: "auto"
    assert full.loss_chunk is None and chunked.loss_chunk == auto.loss_chunk == 512
    lf, lc = full.scenarios[full.chosen]["logits"], chunked.scenarios[chunked.chosen]["logits"]
    assert lf == 4 * 2048 * 128_256 * 12 and lc == 128_256 * (512 * 2 + 32 * 4)  # a frozen head
    assert full.need() - chunked.need() == pytest.approx((lf - lc) * 1.10, rel=1e-9)  # + 10% allocator
    with pytest.raises(SpecError, match="chunked_loss"):
        ll.estimate_memory(LLAMA_1B, chunked_loss="yes", **kw)


def test_designer_shows_both_losses():
    from lora_lab.ui.designer import AdapterDesigner

    d = AdapterDesigner(LLAMA_1B, static=True)
    text = d.summary.value
    assert "chunked loss (512 tokens) (TrainSpec default)" in text and "full-vocabulary loss:" in text


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_prompt_learning_is_planned_with_the_full_loss_as_training_runs_it(method):
    """Prefix and prompt tuning: ``chunked_loss="auto"`` trains with the full loss (peft adds their
    virtual tokens in its own forward, which the chunked loss bypasses) and True is refused.  The
    oracle is training's own rule, ``use_chunked``, asked of a real peft model of a 32k vocabulary;
    the estimate's adapter scenarios follow it, while full FT keeps its chunked loss."""
    import peft
    from transformers import LlamaForCausalLM

    from lora_lab.errors import TrainingError
    from lora_lab.hf.training.chunked_loss import use_chunked

    cfg = LlamaConfig(vocab_size=32_000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    kind = {"prefix": peft.PrefixTuningConfig, "prompt": peft.PromptTuningConfig}[method]
    model = peft.get_peft_model(LlamaForCausalLM(cfg), kind(task_type="CAUSAL_LM", num_virtual_tokens=4))
    assert use_chunked("auto", model) is False
    with pytest.raises(TrainingError):
        use_chunked(True, model)

    spec = ll.AdapterSpec(method=method, num_virtual_tokens=4)
    est = ll.estimate_memory(cfg, spec, batch_size=2, seq_len=1024, device="T4")
    assert est.loss_chunk is None
    tokens = 2 * (1024 + (4 if method == "prompt" else 0))   # prompt tuning's virtual tokens are rows too
    assert est.scenarios[est.chosen]["logits"] == tokens * 32_000 * 12     # T·V·max(c + 8, 12), c = 2
    assert est.scenarios["full FT"]["logits"] == 512 * 32_000 * 12        # full FT: one 512-token chunk
    lora = ll.estimate_memory(cfg, ll.AdapterSpec(r=8), batch_size=2, seq_len=1024, device="T4")
    assert lora.loss_chunk == 512
    with pytest.raises(SpecError, match="chunked_loss") as err:
        ll.estimate_memory(cfg, spec, batch_size=2, seq_len=1024, device="T4", chunked_loss=True)
    assert "virtual tokens" in str(err.value)


def test_designer_shows_one_loss_for_prompt_tuning():
    from lora_lab.ui.designer import AdapterDesigner

    d = AdapterDesigner(LLAMA_1B, static=True)
    d.method.value = "prompt"
    assert d.error == "", d.error
    text = d.summary.value
    assert "full-vocabulary loss (TrainSpec default)" in text and "chunked loss" not in text
