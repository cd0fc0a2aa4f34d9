"""Compiled decoder layers for training (``TrainSpec(compile=True)``).

Eager PyTorch runs a transformer layer as a few dozen separate kernels: each norm, cast, rotary
multiply, residual add and activation reads and writes the whole ``(B, T, d)`` activation again.
On a CPU the matrix products are already near the chip's limit (``aten::mm`` at 73–84% of the bf16
rate for SmolLM2), and the rest of a step is these memory-bound kernels and the attention.
``torch.compile`` (TorchInductor) fuses them into a handful of generated C++ loops per layer.

What is compiled: each decoder layer, the modules a model lists in ``_no_split_modules``
(``LlamaDecoderLayer`` and the like), with ``nn.Module.compile``: the layer's call goes through the
compiled function and its parameters, names and state dict stay as they are (so checkpoints,
adapters and peft's hooks are untouched).  All layers share one graph: dynamo treats a layer's
parameters as inputs, so a 30-layer model compiles once (25–30 s for SmolLM2 on 2 cores, about 4 s
once inductor's on-disk cache is warm), not 30 times; dynamo compiles a second, dynamic-shape graph
when a second sequence length comes, and no more after that (``benchmarks/compile.py``).  The
embedding, the LM head and the (chunked) loss stay eager: the loss already avoids the big
temporaries and the head is one matmul.

Under activation checkpointing the checkpointed forward is traced inside the compiled layer;
dynamo gives up on a region that writes state outside it, which transformers' hub-kernel hooks
do around attention, so the patch in :meth:`CompiledLayers.__enter__` lets the recompute skip such
writes.  Without it the layers silently ran eagerly (``tests/train/test_compile.py`` counts the
graphs dynamo captured).  Dropout masks are drawn again identically in the recompute.

Only while training: :class:`CompiledLayers` compiles on enter and restores the eager call on exit,
so evaluation inside the run, generation and merges afterwards run eagerly (generation would
otherwise recompile for each new length).  Evaluation inside the run uses :meth:`eager`.

It needs what inductor needs: a C++ compiler on a CPU (g++ or clang++), Triton on a GPU, and a C
compiler there too (gcc or clang, or ``$CC``), with which Triton builds its kernel launchers.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil

import torch

from ...errors import TrainingError
from .._peft import base_of

__all__ = ["decoder_layers", "compiler_missing", "CompiledLayers", "is_compile_error", "compile_failure"]


def decoder_layers(model) -> list[torch.nn.Module]:
    """The model's repeated decoder blocks: modules whose class is in ``_no_split_modules``.

    A peft model is searched through its base model; the list is in module order.
    """
    base = base_of(model)
    names = set(getattr(base, "_no_split_modules", None) or [])
    return [m for m in base.modules() if type(m).__name__ in names]


def compiler_missing(device_type: str) -> str | None:
    """Why inductor cannot build kernels for ``device_type`` here, or None when it can."""
    if device_type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "torch.compile on a GPU needs Triton, which is not installed"
        # Triton builds a small C launcher per kernel at run time: $CC, else gcc, else clang
        # (triton/runtime/build.py, get_cc); without one the first compiled step fails
        return _missing("CC", ("gcc", "clang"), "torch.compile on a GPU needs Triton, which builds a C "
                        "launcher for its kernels, and no C compiler was found")
    return _missing("CXX", ("g++", "clang++", "c++"),
                    "torch.compile on a CPU builds C++ kernels and no C++ compiler was found")


def _missing(env: str, names: tuple[str, ...], why: str) -> str | None:
    """``why`` and what was looked for, when neither ``$env`` (if set) nor any of ``names`` is on PATH."""
    chosen = os.environ.get(env)
    if any(shutil.which(c) for c in ((chosen,) if chosen else names)):
        return None
    return f"{why} ({env + '=' + chosen if chosen else ', '.join(names)} not on PATH)"


def is_compile_error(exc: BaseException) -> bool:
    """Whether ``exc`` came from dynamo or inductor (tracing, lowering, the C++ build, or too many
    graphs); not an error in the computation itself that tracing found first (``TorchRuntimeError``:
    the eager run would raise it too)."""
    try:
        from torch._dynamo.exc import FailOnRecompileLimitHit, TorchDynamoException, TorchRuntimeError
    except ImportError:  # pragma: no cover - torch without dynamo
        return False
    return (isinstance(exc, (TorchDynamoException, FailOnRecompileLimitHit))
            and not isinstance(exc, TorchRuntimeError))


def compile_failure(exc: BaseException) -> TrainingError:
    """The error to raise for a dynamo/inductor failure ``exc``: its first line, and the way out."""
    text = str(exc).strip()
    first = text.splitlines()[0][:300] if text else type(exc).__name__
    return TrainingError(f"torch.compile failed on this model's decoder layers: {first}",
                         "pass TrainSpec(compile=False): the same training, eager (the adapter of the "
                         "last finished step was saved); after many compiled runs in one kernel, "
                         "torch._dynamo.reset() forgets their graphs")


class CompiledLayers:
    """Compile ``model``'s decoder layers on ``__enter__``; restore the eager call on ``__exit__``.

    ``with CompiledLayers(model, device_type): train...`` leaves the model as it found it, also
    when the block raises.  Refuses, before anything changes, a model with no decoder layers to
    find and a machine without the compiler inductor needs (:class:`TrainingError` with the fix).
    """

    def __init__(self, model, device_type: str):
        self.layers = decoder_layers(model)
        if not self.layers:
            raise TrainingError(
                f"TrainSpec(compile=True) compiles the decoder layers, and {type(model).__name__} "
                "lists none (its _no_split_modules is empty).",
                "pass compile=False for this model")
        missing = compiler_missing(device_type)
        if missing:
            raise TrainingError(
                f"{missing}.",
                "install one (apt install g++, or conda install -c conda-forge gxx; pip install triton "
                "on a GPU), or pass TrainSpec(compile=False): the same training, eager")
        self.was = [layer._compiled_call_impl for layer in self.layers]
        self._config = None

    def __enter__(self) -> "CompiledLayers":
        import torch._dynamo

        # Under activation checkpointing the layer's forward runs inside torch.utils.checkpoint,
        # which dynamo traces as one region; a write to state outside it (transformers' hub-kernel
        # layers set a context variable around attention) would make dynamo give up on the whole
        # layer and run it eagerly.  Such writes only pick kernels, so the backward's recompute
        # need not replay them.  Every layer.compile() in the process shares one code object
        # (nn.Module._call_impl), whose graphs dynamo caps at recompile_limit (8) before it runs
        # eagerly with only a log line: each model shape, rank, precision and checkpointing setting
        # of a session adds one.  The cap is raised, and reaching it raises (named by
        # compile_failure) instead of training eagerly unnoticed.
        config = torch._dynamo.config
        self._config = config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True,
                                    recompile_limit=max(64, config.recompile_limit),
                                    fail_on_recompile_limit_hit=True)
        self._config.__enter__()
        for layer in self.layers:
            if layer._compiled_call_impl is None:  # a layer the user compiled stays theirs
                layer.compile()
        return self

    def __exit__(self, *exc) -> None:
        self._restore()
        if self._config is not None:
            self._config.__exit__(None, None, None)
            self._config = None

    def _restore(self) -> None:
        for layer, was in zip(self.layers, self.was):
            layer._compiled_call_impl = was  # nn.Module.compile's own slot; None is eager

    @contextlib.contextmanager
    def eager(self):
        """Run the layers eagerly inside the block (evaluation: no_grad would compile a second graph)."""
        current = [layer._compiled_call_impl for layer in self.layers]
        self._restore()
        try:
            yield
        finally:
            for layer, impl in zip(self.layers, current):
                layer._compiled_call_impl = impl
