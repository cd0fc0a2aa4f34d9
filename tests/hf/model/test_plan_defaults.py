"""estimate_memory (issue 16, item 6): defaults of a training run, the CPU as a device, device
names and units, and full fine-tuning, checked against torch's own allocations."""

import inspect
import os

import pytest
import torch
from lora_testing import allocated_peak

import lora_lab as ll
from lora_lab.core import memory as mem
from lora_lab.errors import LoraLabError, SpecError
from lora_lab.hf.model.plan import estimate_memory

GIB = 2**30


# ----------------------------------------------------------------------------- defaults
def test_defaults_are_those_of_a_default_training_run(tiny_llama_dir):
    train, data = ll.TrainSpec(), ll.DataSpec()
    params = inspect.signature(estimate_memory).parameters
    assert params["batch_size"].default == train.batch_size
    assert params["gradient_checkpointing"].default == train.gradient_checkpointing
    assert params["optimizer"].default == train.optimizer
    assert params["precision"].default == train.precision
    assert params["grad_accum"].default == train.grad_accum
    assert params["seq_len"].default == data.max_length
    est = estimate_memory(tiny_llama_dir, ll.AdapterSpec())
    assert (est.batch_size, est.seq_len, est.gradient_checkpointing, est.optimizer) == \
        (train.batch_size, data.max_length, train.gradient_checkpointing, train.optimizer)
    explicit = estimate_memory(tiny_llama_dir, ll.AdapterSpec(), batch_size=train.batch_size,
                               seq_len=data.max_length, optimizer=train.optimizer,
                               gradient_checkpointing=train.gradient_checkpointing)
    assert est.scenarios == explicit.scenarios


# ----------------------------------------------------------------------------- devices
def _mem_total() -> int:
    """MemTotal of /proc/meminfo: the kernel's own count, independent of psutil and sysconf."""
    with open("/proc/meminfo") as fh:
        line = next(ln for ln in fh if ln.startswith("MemTotal:"))
    return int(line.split()[1]) * 1024


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="needs Linux /proc/meminfo")
def test_cpu_is_a_device_with_the_machines_ram(tiny_llama_dir):
    est = estimate_memory(tiny_llama_dir, ll.AdapterSpec(), device="cpu")
    assert est.device_bytes == pytest.approx(_mem_total(), rel=0.01)
    assert "system RAM" in est.device and "system RAM" in repr(est)
    assert est.on_cpu and est.precision == "fp32"            # what lora_lab.train uses on a CPU
    t = est.breakdown
    assert t["cuda_context"] == mem.CPU_RUNTIME                  # no CUDA context on a CPU
    assert t["base_weights"] == 4 * est.total_params             # fp32 weights
    assert "python_and_libraries" in est.table().index
    with pytest.raises(SpecError, match="fp16"):
        estimate_memory(tiny_llama_dir, ll.AdapterSpec(), device="cpu", precision="fp16")


@pytest.mark.parametrize("name", ["A100", "a100", " A100 "])
def test_an_ambiguous_device_name_is_an_error_listing_the_choices(tiny_llama_dir, name):
    with pytest.raises(SpecError) as info:
        estimate_memory(tiny_llama_dir, device=name)
    msg = str(info.value)
    assert "ambiguous" in msg and "A100-40GB" in msg and "A100-80GB" in msg
    assert "device='A100-40GB'" in info.value.fix and "device='A100-80GB'" in info.value.fix
    assert estimate_memory(tiny_llama_dir, device="A100-40GB").device_bytes == 40 * GIB


def test_a_number_is_gib_and_says_so_once(tiny_llama_dir):
    est = estimate_memory(tiny_llama_dir, device=24)
    assert est.device_bytes == 24 * GIB
    assert est.device == "24 GiB" and est.device_text == "24 GiB"
    text = repr(est) + est._repr_html_()
    assert "GB" not in text.replace("GiB", "")                  # no decimal-GB label anywhere
    assert "24 GiB 24 GiB" not in text and "on 24 GiB:" in repr(est)
    named = estimate_memory(tiny_llama_dir, device="T4")
    assert named.device_text == "T4 (16 GiB)" and "T4 (16 GiB)" in repr(named)
    with pytest.raises(SpecError, match="GiB"):
        estimate_memory(tiny_llama_dir, device=-1)


# ----------------------------------------------------------------------------- full fine-tuning
def test_adapter_none_is_full_fine_tuning_counted_like_peft_and_torch(tiny_llama_dir):
    """The trainable count is transformers' own (model.num_parameters(only_trainable=True)); the
    gradient and AdamW-state bytes are those torch allocates after a backward and a step."""
    est = estimate_memory(tiny_llama_dir, device="cpu", optimizer="adamw")
    assert est.chosen == "full FT" and "chosen=full FT" in repr(est)
    model, _ = ll.load_model(tiny_llama_dir, device="cpu")          # fp32 on CPU
    assert est.trainable["full FT"] == model.num_parameters(only_trainable=True)
    assert ll.count_parameters(model).trainable == est.trainable["full FT"]
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt = torch.optim.AdamW(params)
    opt.step()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params)
    states = sum(v.numel() * v.element_size() for s in opt.state.values()
                 for k, v in s.items() if k in ("exp_avg", "exp_avg_sq"))
    t = est.breakdown
    assert t["base_weights"] == sum(p.numel() * p.element_size() for p in params)
    assert t["gradients_total"] == grads == 4 * est.total_params  # fp32, as the weights
    assert t["optimizer_states"] == states == 8 * est.total_params  # two fp32 moments
    assert est.table().loc["gradients (all, after backward)", "full FT"] == grads / GIB


def test_full_fine_tuning_in_bf16_keeps_bf16_gradients_and_moments(tiny_llama_dir):
    """torch's AdamW makes its moments with zeros_like(param): bf16 weights, bf16 moments."""
    est = estimate_memory(tiny_llama_dir, device="A100-80GB", precision="bf16")
    model, _ = ll.load_model(tiny_llama_dir, device="cpu", dtype="bfloat16")
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt = torch.optim.AdamW(params)
    opt.step()
    t = est.breakdown
    assert t["gradients_total"] == sum(p.grad.numel() * p.grad.element_size() for p in params)
    assert t["optimizer_states"] == sum(v.numel() * v.element_size() for s in opt.state.values()
                                        for k, v in s.items() if k in ("exp_avg", "exp_avg_sq"))


def test_full_fine_tuning_of_a_quantized_base_is_refused_with_the_fix(tiny_llama_dir):
    with pytest.raises(SpecError) as info:
        estimate_memory(tiny_llama_dir, quant="nf4")
    assert "full fine-tuning" in str(info.value) and "AdapterSpec" in info.value.fix
    assert estimate_memory(tiny_llama_dir, ll.AdapterSpec(), quant="nf4").chosen == "QLoRA"


def test_bad_precision_and_grad_accum_are_errors(tiny_llama_dir):
    for kw in ({"precision": "fp8"}, {"grad_accum": 0}):
        with pytest.raises(LoraLabError, match=next(iter(kw))):
            estimate_memory(tiny_llama_dir, **kw)


# ----------------------------------------------------------------------------- the peak, measured
def _dynamic_peak(model, opt, ids, micro: int) -> int:
    """Peak of the bytes torch allocates during one optimizer step of ``micro`` micro-batches
    (from the profiler's allocation events, in time order), over what existed before it."""

    def step():
        for _ in range(micro):
            loss = model(input_ids=ids, labels=ids).loss / micro
            loss.backward()
            del loss
        opt.step()
        opt.zero_grad(set_to_none=True)

    return allocated_peak(step)                 # the AdamW moments exist after its unprofiled first call


@pytest.mark.parametrize("micro", [1, 2])
def test_full_ft_peak_matches_torch_allocations(micro):
    """Full FT, fp32, 4 x 64 unpadded tokens.  With one micro-batch the step peaks at the end of the
    forward pass, before any gradient exists (the loop frees them after each step); with two, the
    first micro-batch's gradients live through the second forward.  The estimate's dynamic terms
    (gradients + activations + logits at the peak) match torch's allocations within 10%, and
    counting the gradients at a one-micro-batch peak would be off by over 20%."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=2000)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (4, 64))
    measured = _dynamic_peak(model, opt, ids, micro)
    est = estimate_memory(cfg, None, batch_size=4, seq_len=64, device="cpu", padded=False,
                          grad_accum=micro)
    t = est.breakdown
    dynamic = t["gradients"] + t["activations"] + t["logits"]
    assert dynamic == pytest.approx(measured, rel=0.10)
    assert t["gradients"] == (t["gradients_total"] if micro > 1 else 0)
    if micro == 1:
        assert dynamic + t["gradients_total"] > 1.2 * measured


@pytest.mark.parametrize("tied", [False, True])
def test_full_ft_backward_peak_with_tied_embeddings(tied):
    """A short step (1 x 8 tokens) peaks at the end of the backward pass: every gradient, and for
    tied embeddings two V x h temporaries more (the embedding's dense gradient and its sum with
    the LM head's), as torch allocates them."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=8000,
                      tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    measured = _dynamic_peak(model, opt, torch.randint(0, cfg.vocab_size, (1, 8)), 1)
    t = estimate_memory(cfg, None, batch_size=1, seq_len=8, device="cpu", padded=False).breakdown
    extra = 2 * cfg.vocab_size * cfg.hidden_size * 4 if tied else 0
    assert t["gradients"] == t["gradients_total"] + extra
    assert t["gradients"] + t["activations"] + t["logits"] == pytest.approx(measured, rel=0.05)
