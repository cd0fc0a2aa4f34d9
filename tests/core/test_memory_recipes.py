"""Training recipes (issue 23, item 3): what a trained parameter costs depends on the chip.

Oracles: torch's own ``GradScaler`` (it refuses fp16 gradients, so a T4 trains fp32 master weights),
and the bytes torch really allocates for weights, gradients and AdamW moments after a step.
"""

import pytest
import torch

from lora_lab.core import memory as mem
from lora_lab.core.recipes import adapter_recipe, full_ft_recipe

ARCH = mem.Architecture(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, head_dim=16,
                        vocab=100)


def _scaled_step(param: torch.nn.Parameter, device_type: str = "cpu") -> None:
    """One loss-scaled step, as a T4 needs it: scale, backward, unscale, step."""
    scaler = torch.amp.GradScaler(device_type, init_scale=1024.0)
    opt = torch.optim.AdamW([param])
    with torch.autocast(device_type, dtype=torch.float16):
        loss = (param.unsqueeze(0) @ torch.ones(param.shape[0], 1)).float().sum()
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()


def test_gradscaler_refuses_fp16_gradients_so_fp16_full_ft_needs_fp32_master_weights():
    """torch's GradScaler (the CPU one here; the CUDA one runs the same check) refuses to unscale
    fp16 gradients: pure fp16 full fine-tuning does not train.  fp32 master weights under fp16
    autocast do, and that is the recipe the estimate assumes for fp16 (a T4)."""
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        _scaled_step(torch.nn.Parameter(torch.randn(8, dtype=torch.float16)))
    master = torch.nn.Parameter(torch.randn(8))
    before = master.detach().clone()
    _scaled_step(master)                                 # fp32 weights, fp16 matmul: it trains
    assert master.grad.dtype == torch.float32 and not torch.equal(master, before)
    r = full_ft_recipe("fp16")
    assert r.scaler and r.master_weights and r.weight_bytes == 4 and r.compute == "fp16"


@pytest.mark.parametrize("precision, per_param", [("fp16", 16), ("fp32", 16), ("bf16", 8)])
def test_full_ft_bytes_per_param_follow_the_device(precision, per_param):
    """T4 (fp16): 4 + 4 + 8 (fp32 master weights, gradients, AdamW).  CPU (fp32): the same.
    bf16 chips: pure bf16, 2 + 2 + 4."""
    r = full_ft_recipe(precision)
    assert r.bytes_per_param("adamw") == per_param
    assert r.bytes_per_param("sgd") == 2 * r.weight_bytes
    assert f"= {per_param} B/param" in r.sum_text() and r.why in r.describe()


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_adapters_are_fp32_on_every_chip(precision):
    """peft's autocast_adapter_dtype=True: adapter weights, gradients and moments are fp32."""
    r = adapter_recipe(precision)
    assert r.adapters and r.weight_bytes == 4 and r.bytes_per_param() == 16
    assert r.compute == precision and r.scaler == (precision == "fp16")
    assert "per adapter param" in r.sum_text()
    with pytest.raises(ValueError, match="fp8"):
        adapter_recipe("fp8")


def test_master_weights_change_the_layer_activations_by_hand():
    # frozen 1664 (see test_memory.py); pure full FT keeps c*(5h + i) = 2*(320 + 128) = 896 more
    assert mem.layer_activation_bytes(ARCH, 2, full=True) == 1664 + 896
    # fp32 master weights under fp16 autocast: fp32 normalised inputs 2*4*64 = 512, and q, k, v,
    # gate, up each cast their fp32 input: 2*(6*64 + 128) = 1024
    assert mem.layer_activation_bytes(ARCH, 2, full=True, master=True) == 1664 + 512 + 1024


def test_memory_terms_of_fp32_master_weights_by_hand():
    P, copies = 10_000, 6_000
    mixed = mem.TrainableLayout(params=P, param_bytes=4, full=True, autocast_copies=copies)
    assert mixed.master_weights(2) and not mixed.master_weights(4)
    t = mem.memory_terms(arch=ARCH, total_params=P, unquantized_params=0, trainable=mixed,
                         batch=2, seq=8, checkpointing=False, compute_bytes=2, padded=False)
    assert t["base_weights"] == 4 * P and t["gradients_total"] == 4 * P
    assert t["optimizer_states"] == 8 * P                 # 4 + 4 + 8 = 16 bytes/param
    T = 16
    kept, _ = mem.activation_bytes(ARCH, mixed, 2, 8, False, 2)
    assert kept == T * 2 * (1664 + 512 + 1024) + T * 4 * 64
    assert t["activations"] == kept + 2 * copies          # autocast's fp16 weight copies
    pure = mem.TrainableLayout(params=P, param_bytes=2, full=True)
    b = mem.memory_terms(arch=ARCH, total_params=P, unquantized_params=0, trainable=pure,
                         batch=2, seq=8, compute_bytes=2)
    assert b["base_weights"] + b["gradients_total"] + b["optimizer_states"] == 8 * P
    # with checkpointing, the kept layer inputs are the fp32 residual stream
    ck, one = mem.activation_bytes(ARCH, mixed, 2, 8, True, 2)
    assert ck == T * 2 * 4 * 64 + one + T * 4 * 64
