"""``TrainSpec(compile=True)``: the decoder layers run through torch.compile while training.

Oracle: the eager run of the same spec (PyTorch's own eager kernels).  In fp32 the compiled run
gives the same per-step and eval losses (1e-5 relative) and the same adapter; the graphs dynamo
captured are counted, so a silent fall back to eager (a graph break under activation
checkpointing, measured before the fix) fails the test.  After the run the layers are eager again.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import lora_lab as ll
from lora_lab.errors import SpecError, TrainingError
from lora_lab.hf.training.compile import (
    CompiledLayers,
    compile_failure,
    compiler_missing,
    decoder_layers,
    is_compile_error,
)

needs_compiler = pytest.mark.skipif(compiler_missing("cpu") is not None,
                                    reason="torch.compile on a CPU needs a C++ compiler")


def _run(tmp_path, name, compile, dropout=0.0, **spec):
    from conftest import response_rows  # tests/train/conftest.py

    model, tok = ll.load_model("builtin:tiny", device="cpu")
    torch.manual_seed(0)
    model = ll.attach(model, ll.AdapterSpec(r=4, target_modules="all-linear", dropout=dropout))
    rows = response_rows(tok, (1, 3, 12, 20, 5, 9, 4, 7))
    spec = ll.TrainSpec(steps=4, batch_size=4, lr=1e-2, seed=0, output_dir=str(tmp_path / name),
                        eval_every=2, precision="fp32", compile=compile, **spec)
    return model, ll.train(model, tok, rows, eval_data=rows[:3], spec=spec)


def _captured() -> int:
    return counters["stats"]["calls_captured"]


def _losses(result, col):
    h = result.history
    return h[h[col].notna()][col].to_numpy(float)


@needs_compiler
@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_training_equals_eager_in_fp32(tmp_path, one_thread, checkpointing):
    _, eager = _run(tmp_path, "eager", False, gradient_checkpointing=checkpointing)
    before = _captured()
    model, compiled = _run(tmp_path, "compiled", True, gradient_checkpointing=checkpointing)
    assert _captured() > before, "dynamo captured no graph: the layers ran eagerly"
    # measured equal to 1e-5 here; 1e-4 leaves room for inductor's code on other CPUs (AVX2)
    for col in ("loss", "eval_loss"):
        assert _losses(compiled, col) == pytest.approx(_losses(eager, col), rel=1e-4)
    assert compiled.final["compiled"] is True and eager.final["compiled"] is False
    assert compiled.final["gradient_checkpointing"] is checkpointing
    a = ll.load_adapter(ll.load_model("builtin:tiny", device="cpu")[0], eager.adapter_path)
    b = ll.load_adapter(ll.load_model("builtin:tiny", device="cpu")[0], compiled.adapter_path)
    sa, sb = a.state_dict(), b.state_dict()
    # Adam divides by sqrt(v): entries whose gradient is near 0 move by ±lr on float rounding
    # alone, so the adapters are compared as a whole, not entry by entry
    flat_a = torch.cat([sa[k].flatten() for k in sa if "lora_" in k])
    flat_b = torch.cat([sb[k].flatten() for k in sb if "lora_" in k])
    assert flat_a.numel() > 0 and float((flat_a - flat_b).norm() / flat_a.norm()) < 1e-3
    assert _losses(compiled, "grad_norm") == pytest.approx(_losses(eager, "grad_norm"), rel=1e-4)
    assert all(layer._compiled_call_impl is None for layer in decoder_layers(model))  # eager again


@needs_compiler
def test_checkpointing_replays_the_compiled_dropout(tmp_path, one_thread):
    """Under checkpointing the backward recomputes each layer: its LoRA dropout must draw the same
    mask as the forward did, or the gradient belongs to another network."""
    _, plain = _run(tmp_path, "plain", True, dropout=0.1)
    _, ckpt = _run(tmp_path, "ckpt", True, dropout=0.1, gradient_checkpointing=True)
    for col in ("loss", "eval_loss"):
        assert _losses(ckpt, col) == pytest.approx(_losses(plain, col), rel=1e-5)


@needs_compiler
def test_layers_are_eager_again_after_an_error_and_a_users_compile_stays(tmp_path, one_thread):
    class Boom(ll.Callback):
        def on_step(self, state, control):
            raise RuntimeError("boom")

    model, tok = ll.load_model("builtin:tiny", device="cpu")
    model = ll.attach(model, ll.AdapterSpec(r=4))
    layers = decoder_layers(model)
    assert len(layers) == model.config.num_hidden_layers
    layers[0].compile()  # the user's own
    mine = layers[0]._compiled_call_impl
    from conftest import token_rows

    spec = ll.TrainSpec(steps=3, batch_size=4, output_dir=str(tmp_path / "run"), compile=True,
                        precision="fp32")
    with pytest.raises(RuntimeError, match="boom"):
        ll.train(model, tok, token_rows(tok, 8), None, spec, callbacks=[Boom()])
    assert layers[0]._compiled_call_impl is mine
    assert all(layer._compiled_call_impl is None for layer in layers[1:])
    assert (tmp_path / "run").exists()  # the adapter of step 1 was saved


def test_refused_before_anything_changes(tmp_path, monkeypatch):
    model, tok = ll.load_model("builtin:tiny", device="cpu")
    model = ll.attach(model, ll.AdapterSpec(r=4))
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert "no C++ compiler" in compiler_missing("cpu")
    with pytest.raises(TrainingError, match="C\\+\\+ compiler") as info:
        CompiledLayers(model, "cpu")
    assert "compile=False" in info.value.fix
    from conftest import token_rows

    spec = ll.TrainSpec(steps=2, output_dir=str(tmp_path / "run"), compile=True)
    with pytest.raises(TrainingError, match="C\\+\\+ compiler"):
        ll.train(model, tok, token_rows(tok, 4), None, spec)
    assert not (tmp_path / "run").exists()
    monkeypatch.delenv("CXX")

    no_layers = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(TrainingError, match="_no_split_modules"):
        CompiledLayers(no_layers, "cpu")
    for bad in ("yes", 1, None):
        with pytest.raises(SpecError, match="compile"):
            ll.TrainSpec(compile=bad)


def test_a_compile_failure_is_named_with_the_fix():
    from torch._dynamo.exc import InternalTorchDynamoError

    exc = InternalTorchDynamoError("cannot lower aten.foo\nlong trace ...")
    assert is_compile_error(exc) and not is_compile_error(RuntimeError("cuda out of memory"))
    err = compile_failure(exc)
    assert isinstance(err, TrainingError) and "cannot lower aten.foo" in str(err)
    assert "long trace" not in str(err) and "compile=False" in err.fix


@needs_compiler
def test_the_graph_cap_is_raised_and_loud_only_inside_the_run():
    """Every layer.compile() shares nn.Module._call_impl's code object, whose graphs dynamo caps
    (8 by default) before running eagerly with only a log line: inside the run the cap is 64 and
    reaching it raises; outside, the user's settings are as they were."""
    import torch._dynamo.config as config

    model, _ = ll.load_model("builtin:tiny", device="cpu")
    before = (config.recompile_limit, config.fail_on_recompile_limit_hit)
    with CompiledLayers(model, "cpu") as compiled:
        assert config.recompile_limit >= 64 and config.fail_on_recompile_limit_hit
        assert all(layer._compiled_call_impl is not None for layer in compiled.layers)
        with compiled.eager():
            assert all(layer._compiled_call_impl is None for layer in compiled.layers)
        assert all(layer._compiled_call_impl is not None for layer in compiled.layers)
    assert (config.recompile_limit, config.fail_on_recompile_limit_hit) == before
    assert all(layer._compiled_call_impl is None for layer in compiled.layers)
    from torch._dynamo.exc import FailOnRecompileLimitHit, TorchRuntimeError

    assert is_compile_error(FailOnRecompileLimitHit("limit")) and not is_compile_error(TorchRuntimeError("x"))


def test_gpu_needs_triton_and_a_c_compiler(monkeypatch, tmp_path):
    """Triton builds its kernel launchers with $CC, else gcc, else clang (triton/runtime/build.py):
    without one the first compiled step would fail, so it is refused up front like a missing C++
    compiler on a CPU."""
    import importlib.util

    real = importlib.util.find_spec

    def triton(spec):
        find = lambda name, *a: spec if name == "triton" else real(name, *a)  # noqa: E731
        monkeypatch.setattr(importlib.util, "find_spec", find)

    triton(None)
    assert "needs Triton" in compiler_missing("cuda")
    triton(object())                              # Triton present (this CPU build of torch has none)
    monkeypatch.setenv("CC", "/nonexistent/cc")
    why = compiler_missing("cuda")
    assert "no C compiler" in why and "CC=/nonexistent/cc" in why
    cc = tmp_path / "cc"
    cc.write_text("#!/bin/sh\n")
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))             # an executable $CC: Triton would use it
    assert compiler_missing("cuda") is None
    monkeypatch.delenv("CC")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))   # no gcc, no clang
    assert "gcc, clang not on PATH" in compiler_missing("cuda")
