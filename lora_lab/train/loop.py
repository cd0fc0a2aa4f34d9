"""``lora_lab.train``: a short, explicit training loop that never loses work.

One optimizer step (``TrainSpec.grad_accum`` = K micro-batches of ``batch_size`` rows)::

    N = Σ_k n_k                      # supervised tokens in the step (labels ≠ -100 after the shift)
    for each micro-batch k:          # forward under autocast (fp16/bf16/none)
        loss_k = model(batch_k).loss · n_k / N      # its mean, weighted by its share of tokens
        check loss_k is finite       # else: save the last good adapter, raise
        (scaler.scale(loss_k) if fp16 else loss_k).backward()
    loss = Σ_k loss_k = Σ_micro Σ_tokens ℓ / N      # the step's loss, as one batch of K·batch_size
    g = clip_grad_norm_(adapter params, max_grad_norm)  # also the logged grad norm
    lr = spec.lr · lr_factor(step)   # transformers' get_scheduler, step for step (0 at step 0 with warmup)
    optimizer.step(); optimizer.zero_grad()

Why tokens and not micro-batches: :mod:`lora_lab.train.step`.  ``TrainSpec.chunked_loss`` swaps
``model(batch).loss`` for the same loss computed over chunks of the logits, one chunk in memory
(:mod:`lora_lab.hf.training.chunked_loss`).  Weight decay skips biases and norm weights, and the
schedule is transformers' (:mod:`lora_lab.train.optim`).  Each step is timed alone
(:class:`~lora_lab.train.measure.StepTimer`): tokens/s counts every non-padding token, supervised
tokens/s only those the loss averages over.

Around it the loop emits ``begin``, ``step``, ``eval``, ``save`` and ``end`` to callbacks
(:mod:`lora_lab.train.events`) and reads the :class:`~lora_lab.train.events.Control` between steps.

**Nothing trained is lost.**  Every way out saves the adapter (atomically, see
:mod:`lora_lab.train.checkpoint`) before returning or raising: the end of the run, ``Control.stop``
(a button or a callback), ``KeyboardInterrupt`` (the kernel's interrupt button: ``train`` returns
with ``stop_reason="interrupted"``), an exception inside a step (saved, then re-raised), and a
NaN/inf loss or grad norm.  The finiteness check happens *before* the optimizer step, so the weights
saved then are those of the last good step, never the NaN ones; ``train`` then raises
:class:`~lora_lab.errors.TrainingError` naming the step.

**Buttons while the loop runs.**  The loop runs on the calling thread, so a notebook cell blocks
until training ends ("Run All" keeps its order; a script and nbclient need nothing special) and the
interrupt button raises ``KeyboardInterrupt`` where it is handled.  Views hear their buttons through
the ``step``/``wait`` events: :class:`lora_lab.ui.TrainingDashboard` processes the kernel's pending
widget messages there (see its module docstring), and ``Control`` is thread-safe for kernels that
deliver them on another thread.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..errors import TrainingError
from ..hf._peft import InputCastOff, active_name, is_peft, tuner_layers
from ..hf.model import heap
from ..hf.model.attention import Fp32Attention
from ..hf.model.device import hidden_size_of, train_precision_choice
from ..hf.model.kbit import unpack_4bit_weights
from ..hf.training.chunked_loss import use_chunked
from ..hf.training.compile import CompiledLayers, compile_failure, is_compile_error
from ..specs import TrainSpec
from .checkpoint import load_training_state, restore_rng_state, restore_trainable, rng_state, save_checkpoint
from .data import Batches, eval_batches, resolve_data
from .events import Autosave, Control, TrainState, emit, wait_while_paused
from .history import History
from .measure import StepTimer, memory_mb, peak_rss_mb
from .optim import build_optimizer, lr_factor, resolve_precision
from .result import TrainResult
from .step import NonFinite, TrainMode, accumulate, loss_kind, loss_sum, precision_label

__all__ = ["train", "TrainResult"]


def _device(model) -> torch.device:
    for p in model.parameters():
        if p.requires_grad:
            return p.device
    raise TrainingError("The model has no trainable parameters.",
                        "attach an adapter first: model = lora_lab.attach(model, AdapterSpec())")


def _require_adapter(model) -> None:
    """Refuse, before anything changes, a model without an adapter: every base weight would train
    in place (134.5 M parameters and about 3 GB for SmolLM2-135M) and no adapter could be saved."""
    if not is_peft(model):
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        raise TrainingError(
            f"This model has no adapter, so train() would update all {n:,} base weights in place "
            "(full fine-tuning), which lora_lab's loop does not do.",
            "attach an adapter first: model = lora_lab.attach(model, lora_lab.AdapterSpec(r=8)), "
            "or load one with lora_lab.load_adapter(model, folder, trainable=True)")
    _device(model)


def _default_dir(model) -> Path:
    """``runs/<timestamp>-<adapter>`` under the working directory (``-2``, ... if taken)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path.cwd() / "runs" / f"{stamp}-{active_name(model) or 'adapter'}"
    path, k = base, 2
    while path.exists():
        path, k = base.with_name(f"{base.name}-{k}"), k + 1
    return path


def _max_positions(model) -> int | None:
    """The longest row the model can take, less prompt tuning's virtual tokens: padding to a
    multiple stops there (a model with learned absolute positions fails past it)."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    config = getattr(model, "active_peft_config", None)
    if n and getattr(config, "peft_type", None) is not None and config.peft_type.value == "PROMPT_TUNING":
        n -= int(config.num_virtual_tokens or 0)
    return int(n) if n else None


def _forward_kwargs(model) -> dict:
    """``use_cache=False``: training never reuses the KV cache (prompt learning needs it on)."""
    config = getattr(model, "active_peft_config", None)
    return {} if getattr(config, "is_prompt_learning", False) else {"use_cache": False}


class _Run:
    """The mutable side of one run: model, optimizer, step counter and measurements."""

    def __init__(self, model, tokenizer, spec, train_rows, eval_rows, callbacks, run_dir):
        self.model, self.spec, self.eval_rows, self.train_mode = model, spec, eval_rows, TrainMode(model)
        self.device = _device(model)
        choice = train_precision_choice(spec.precision, self.device.type, hidden_size_of(model))  # CPU "auto"
        self.precision = resolve_precision(choice, self.device, model)
        # under autocast peft's fp32 cast of each adapter input is undone at once: skip it (hf/_peft.py)
        self.cast_off = InputCastOff(tuner_layers(model) if self.precision.dtype is not None else [])
        pad = tokenizer.pad_token_id
        self.pad_id = int(tokenizer.eos_token_id if pad is None else pad)
        # round padded lengths (fewer shapes), never past the model's positions
        self.pad_shape = (spec.pad_to_multiple_of, _max_positions(model))
        self.batches = Batches(train_rows, spec.batch_size, spec.seed, self.pad_id, *self.pad_shape)
        self.max_steps = spec.steps or self.batches.steps_for(spec.epochs, spec.grad_accum)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(spec, model, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision.scaler else None
        self.fwd = _forward_kwargs(model)
        self.history = History()
        self.callbacks = [self.history, *([Autosave(spec.autosave_minutes)] if spec.autosave_minutes else []),
                          *callbacks]
        self.control = Control()
        self.run_dir, self.adapter = Path(run_dir), active_name(model)
        self.step, self.tokens, self.session_tokens, self.session_supervised = 0, 0, 0, 0
        self.chunk = spec.loss_chunk_size if use_chunked(spec.chunked_loss, model) else None
        # the decoder layers compiled while the loop runs (hf/training/compile.py); refused up front
        self.compiled = CompiledLayers(model, self.device.type) if spec.compile else None
        # CPU + bf16 autocast: attention in fp32, faster there and exact (hf/model/attention.py)
        self.attention = Fp32Attention(model, self.device.type, self.precision.dtype)
        self.last: dict = {"loss_kind": loss_kind(self.chunk), "precision": precision_label(self.precision),
                           "compiled": spec.compile}
        self.checkpoint: str | None = None
        self.timer = StepTimer()

    # ------------------------------------------------------------------ state and events
    def state(self, event: str, **extra) -> TrainState:
        left = self.max_steps - self.step
        mem = memory_mb(self.device)
        return TrainState(event=event, step=self.step, max_steps=self.max_steps,
                          run=self.run_dir.name, epoch=self.batches.epoch_of(self.micro),
                          tokens=self.tokens, elapsed_s=self.timer.elapsed,
                          eta_s=self.timer.eta(left), checkpoint=self.checkpoint,
                          **mem, **{**self.last, **extra})

    def emit(self, event: str, **extra) -> TrainState:
        state = self.state(event, **extra)
        emit(self.callbacks, event, state, self.control)
        return state

    @property
    def micro(self) -> int:
        return self.step * self.spec.grad_accum

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self) -> None:
        """One optimizer step over K micro-batches (module docstring), timed alone."""
        spec = self.spec
        self.timer.begin()
        self.train_mode.ensure()
        batches = [{n: t.to(self.device, non_blocking=True)
                    for n, t in self.batches(self.micro + k).items()} for k in range(spec.grad_accum)]
        try:
            with self.cast_off:
                acc = accumulate(self.model, batches, forward_kwargs=self.fwd, precision=self.precision,
                                 scaler=self.scaler, step=self.step + 1, chunk_size=self.chunk)
        except NonFinite:
            self.optimizer.zero_grad(set_to_none=True)
            raise
        except Exception as exc:
            if self.compiled is not None and is_compile_error(exc):  # named, with the fix
                raise compile_failure(exc) from exc
            raise
        lr = spec.lr * lr_factor(self.step, self.max_steps, spec)
        norm = self._update(lr) if acc.supervised else 0.0  # nothing supervised: no update
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the update's kernels belong to this step's time
        self.step += 1
        self.tokens += acc.tokens
        self.session_tokens += acc.tokens
        self.session_supervised += acc.supervised
        tps, sup_tps = self.timer.end(acc.tokens, acc.supervised)
        self.last.update(loss=acc.loss, lr=lr, grad_norm=norm, tokens_per_s=tps,
                         supervised_tokens_per_s=sup_tps)

    def _update(self, lr: float) -> float:
        """Clip, set the learning rate, step the optimizer; return the grad norm before clipping."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.spec.max_grad_norm or math.inf))
        if not math.isfinite(norm) and self.scaler is None:  # fp16 overflow is the scaler's job
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFinite(self.step + 1, "grad norm", norm)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean eval loss over all supervised tokens: Σ_batches mean_b · n_b / Σ n_b."""
        self.model.eval()
        num, den = 0.0, 0
        eager = self.compiled.eager() if self.compiled else contextlib.nullcontext()  # no 2nd graph
        with eager:
            for batch in eval_batches(self.eval_rows, self.spec.batch_size, self.pad_id, *self.pad_shape):
                batch = {n: t.to(self.device) for n, t in batch.items()}
                with self.precision.autocast(), self.cast_off:
                    summed, n = loss_sum(self.model, batch, self.fwd, self.chunk)
                num, den = num + summed, den + n
        self.model.train()
        self.last["eval_loss"] = num / max(den, 1)
        return self.last["eval_loss"]

    # ------------------------------------------------------------------ saving and resuming
    def save(self, reason: str) -> str:
        state = {"optimizer": self.optimizer.state_dict(), "reason": reason,
                 "scaler": self.scaler.state_dict() if self.scaler else None,
                 **rng_state(), "tokens": self.tokens,
                 "elapsed_s": self.timer.elapsed, "loss": self.last.get("loss"),
                 "epoch": self.batches.epoch_of(self.micro),
                 "history": self.history.rows, "spec": asdict(self.spec)}
        path = save_checkpoint(self.model, self.run_dir, self.step, state, self.adapter)
        self.checkpoint = str(path)
        self.history.write_csv(self.run_dir / "history.csv")
        self.emit("save")
        return self.checkpoint

    def resume(self, path) -> None:
        saved = load_training_state(path)
        restore_trainable(self.model, saved["trainable"])
        try:
            self.optimizer.load_state_dict(saved["optimizer"])
        except ValueError as exc:  # e.g. one parameter group saved, two now (weight decay split)
            raise TrainingError(f"The optimizer state in {saved['path']} does not fit this run's "
                                f"optimizer ({exc}).",
                                "resume with the TrainSpec of the saved run (same optimizer and "
                                "weight_decay), or start a new run") from exc
        if self.scaler is not None and saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        restore_rng_state(saved)
        self.step, self.tokens = int(saved["step"]), int(saved["tokens"])
        self.timer.carry(float(saved["elapsed_s"]))  # elapsed continues from the saved run
        self.history.rows = [dict(r) for r in saved["history"]]
        self.last["loss"] = saved.get("loss")
        if self.step >= self.max_steps:
            raise TrainingError(f"The checkpoint {saved['path']} is at step {self.step}, which is "
                                f"already TrainSpec.steps = {self.max_steps}.",
                                "pass a larger steps (the total, counting the resumed ones)")


def _final(run: _Run) -> dict:
    cuda = run.device.type == "cuda"
    peak = torch.cuda.max_memory_allocated(run.device) / 2**20 if cuda else peak_rss_mb()
    elapsed = run.timer.elapsed
    step_s = max(run.timer.step_s, 1e-9)  # time inside training steps, this session
    return {"loss": run.last.get("loss"), "eval_loss": run.last.get("eval_loss"),
            "tokens_per_s": run.session_tokens / step_s,
            "supervised_tokens_per_s": run.session_supervised / step_s, "elapsed_s": elapsed,
            "tokens": run.tokens, ("peak_cuda_allocated_mb" if cuda else "peak_rss_mb"): peak,
            "precision": precision_label(run.precision), "optimizer": type(run.optimizer).__name__,
            "gradient_checkpointing": _checkpointing_on(run.model), "loss_kind": loss_kind(run.chunk),
            "compiled": run.compiled is not None, "attention": "sdpa fp32" if run.attention.active else None}


def _checkpointing_on(model) -> bool:
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # transformers 5, 4
        value = getattr(model, name, None)
        if value is not None:
            return bool(value)
    return False


def _set_checkpointing(model, on: bool) -> None:
    """Turn activation checkpointing on when asked; never off behind the user's back."""
    if not on or _checkpointing_on(model):
        return
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


def train(model, tokenizer, train_data, eval_data=None, spec: TrainSpec = TrainSpec(),
          callbacks=(), *, resume_from=None) -> TrainResult:
    """Train the model's active adapter; return a :class:`TrainResult`.

    ``model`` is a peft model from :func:`lora_lab.attach`; ``train_data`` a ``PreparedData``,
    tokenized rows or raw prompt/response rows (see :mod:`lora_lab.train.data`); ``eval_data``
    likewise, or None to use ``train_data``'s eval split.  ``callbacks`` receive the events (e.g. a
    :class:`lora_lab.ui.TrainingDashboard`).  ``resume_from``: a run folder or checkpoint written
    by an earlier ``train``; the step count, optimizer state and history continue from it, and
    ``spec.steps`` is the total.  Checkpoints go to ``spec.output_dir`` (default
    ``runs/<timestamp>-<adapter>``).
    """
    if not isinstance(spec, TrainSpec):
        raise TrainingError(f"spec must be a TrainSpec, not {type(spec).__name__}.",
                            "pass spec=lora_lab.TrainSpec(steps=100)")
    _require_adapter(model)
    train_rows, eval_rows = resolve_data(train_data, eval_data, tokenizer, model)
    run_dir = Path(spec.output_dir) if spec.output_dir else _default_dir(model)
    if not isinstance(callbacks, (list, tuple)):
        callbacks = [callbacks]
    torch.manual_seed(spec.seed)
    _set_checkpointing(model, spec.gradient_checkpointing)
    # an earlier eval/generation may have repacked 4-bit weights: undo it, and switch the
    # repacking off for good, so this run's evaluations cannot repack them (hf/model/kbit.py)
    unpack_4bit_weights(model)
    run = _Run(model, tokenizer, spec, train_rows, eval_rows, list(callbacks), run_dir)
    if run.device.type == "cpu":
        heap.steady_heap()  # the same heap each step, not glibc's luck (hf/model/heap.py)
    if resume_from is not None:
        run.resume(resume_from)
    return _loop(run)


def _steps(run: _Run) -> str:
    """Optimizer steps, evaluations and saves until the last step or a stop; the stop reason."""
    spec, control = run.spec, run.control
    with run.compiled or contextlib.nullcontext():  # eager again before the last evaluation
        while run.step < run.max_steps:
            if control.paused:
                run.timer.exclude(wait_while_paused(run.callbacks, run.state("wait"), control))
            if control.should_stop:
                break
            run.train_step()
            if run.step % spec.log_every == 0 or run.step == run.max_steps:
                run.emit("step")
            if run.eval_rows and spec.eval_every and run.step % spec.eval_every == 0:
                run.evaluate()
                run.emit("eval")
            if (spec.save_every and run.step % spec.save_every == 0) or control.take_save_request():
                run.save("checkpoint")
            if control.should_stop:
                break
    if control.should_stop:
        return f"stopped: {control.reason}"
    if run.eval_rows and not (spec.eval_every and run.step % spec.eval_every == 0):
        run.evaluate()  # a completed run always ends with an evaluation when it has eval data
        run.emit("eval")
    return "completed"


def _loop(run: _Run) -> TrainResult:
    reason, error = "completed", None
    run.emit("begin")
    with contextlib.ExitStack() as scope:  # the run's attention is undone before the last save
        try:
            scope.enter_context(run.attention)
            reason = _steps(run)
        except NonFinite as exc:
            reason, error = "non-finite", exc
        except KeyboardInterrupt:
            reason = "interrupted"
        except Exception as exc:  # noqa: BLE001  (saved below, then re-raised unchanged)
            reason, error = "error", exc
    path = run.save(reason)
    if run.device.type == "cpu":
        heap.trim()  # the steps' freed memory goes back to the OS
    run.emit("end", stop_reason=reason)
    if isinstance(error, NonFinite):
        raise TrainingError(f"Training halted at step {error.step}: the {error.what} is "
                            f"{error.value} (not finite).  The adapter of the last good step "
                            f"({run.step}) was saved to {path}.",
                            "lower TrainSpec.lr, keep max_grad_norm=1.0, or check the data of this "
                            "step; resume with train(..., resume_from=...)") from None
    if error is not None:
        if hasattr(error, "add_note"):
            error.add_note(f"lora_lab: the adapter at step {run.step} was saved to {path}")
        raise error
    return TrainResult(rows=run.history.rows, final=_final(run), adapter_path=path,
                       output_dir=str(run.run_dir), stop_reason=reason, steps=run.step,
                       max_steps=run.max_steps, spec=run.spec)
