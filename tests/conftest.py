"""Shared fixtures: a tiny config-built Llama, and the builtin models.  No test reaches the hub."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A saved tiny Llama (hidden 64, 2 layers, GQA) with deterministic weights and the builtin
    tokenizer: a local folder, as a user's downloaded checkpoint would be."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lora_lab.hf.model.builtin import TOKENIZER_DIR

    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(1234)
    model = LlamaForCausalLM(cfg)
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def require_smollm2() -> None:
    """Skip when ``builtin:smollm2`` cannot load here (its PyPI package is missing); under CI, fail
    instead, because the README's test command installs it."""
    from lora_lab.hf.model import smollm2

    if smollm2.available():
        return
    message = f"builtin:smollm2 needs its package: {smollm2.INSTALL}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def smollm2_dir():
    """The cached fp32 safetensors folder of SmolLM2-135M-Instruct (converted from GGUF once)."""
    require_smollm2()
    from lora_lab.hf.model.builtin import resolve_builtin

    return resolve_builtin("builtin:smollm2")


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    """``(model, tokenizer)`` of builtin:smollm2, fp32 on CPU, shared by a module's tests (about 2 s
    to load; tests that change the model must load their own)."""
    import lora_lab as ll

    return ll.load_model("builtin:smollm2", device="cpu")


@pytest.fixture
def tiny_llama(tiny_llama_dir):
    """``(model, tokenizer)`` for the tiny Llama, fp32 on CPU, freshly loaded for each test."""
    import lora_lab as ll

    return ll.load_model(tiny_llama_dir, device="cpu")


@pytest.fixture
def tiny_llama_nf4(tiny_llama_dir):
    import lora_lab as ll

    return ll.load_model(tiny_llama_dir, quant="nf4", device="cpu")


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module: tiny models gain nothing from intra-op threads, and on a
    shared 2-core machine a second thread that spins waiting for a busy core makes each forward
    ~20x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def bf16_path(monkeypatch):
    """lora_lab's chip check told that this CPU multiplies bf16 natively, so that ``train()`` takes its
    bf16 path here too.  Where the chip emulates bf16 (measured 30-350x slower than fp32) train()
    otherwise refuses bf16, and the run is slow: use it on tiny models only."""
    from lora_lab.hf.model import device

    monkeypatch.setattr(device, "cpu_bf16_native", lambda: True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def report_inputs(tiny_llama_dir, tmp_path_factory, one_thread):
    """What lora_lab.report shows, from a 6-step LoRA run on the tiny Llama: the result, the
    AdapterSpec, spectra, an NF4/int8 scan and a memory estimate (tests/viz/test_report.py and the
    browser test of the report)."""
    import lora_lab as ll

    torch.manual_seed(0)
    model, tok = ll.load_model(tiny_llama_dir, device="cpu")
    adapter = ll.AdapterSpec(r=4, target_modules="attention-qv")
    model = ll.attach(model, adapter)
    data = ll.prepare_dataset(ll.builtin_task("upper", n=64), tok, ll.DataSpec(eval_fraction=0.25))
    out = tmp_path_factory.mktemp("run")
    result = ll.train(model, tok, data, spec=ll.TrainSpec(steps=6, batch_size=8, lr=1e-2,
                                                          eval_every=3, output_dir=str(out)))
    return dict(result=result, spec=adapter, spectra=ll.adapter_spectra(model),
                quant=ll.scan_quantization(tiny_llama_dir, schemes=("nf4", "int8"), progress=False),
                memory=ll.estimate_memory(model))
