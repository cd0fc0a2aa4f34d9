#!/usr/bin/env python
"""lora_lab's CUDA path, checked by one prepared script (issue 20).

Every check below runs in one process, in order of value, each isolated (an exception is recorded
with the end of its traceback and the next check goes on) and each with its own time limit; a
global deadline (``--budget-s``, 480 s by default) skips what is left as "out of time".  The script
prints one JSON summary on stdout and writes it (after every check, so a killed run still leaves
one) to ``OUT_DIR/gpu_check.json``, where OUT_DIR is the positional argument or ``$OUT``.

=================  ==========================================================================
env                torch, CUDA, GPU name, compute capability, and the precision lora_lab picks
bnb_4bit           bitsandbytes' NF4/FP4 kernels on the device: error on N(0,1) against
                   bitsandbytes' published figures, and against the CPU kernels
qlora_train        QLoRA (NF4) training with ``lora_lab.train`` of builtin:tiny and of a
                   Llama-3.2-1B-shaped model (random weights, built from its config), in fp16
                   with a GradScaler (as on a T4) and in bf16: the loss is finite and falls;
                   the dashboard's memory series come from CUDA statistics
memory_planner     ``estimate_memory`` against ``torch.cuda.max_memory_reserved()`` (and
                   allocated) for 8 LoRA/QLoRA setups of the 1B shape: the ratios, target ±15%
merge              ``merged_copy`` and ``merge_checked`` on CUDA with the logit check, LoRA and
                   QLoRA, against an unmerged full-precision oracle
paged_optimizer    ``paged_adamw_8bit``, ``adamw_8bit`` and ``paged_adamw`` through ``lora_lab.train``
export_accelerate  the exported ``train.py`` under ``accelerate launch`` (one GPU) for a few
                   steps; its adapter loads back with ``lora_lab.load_adapter``
throughput         tokens/s of ``lora_lab.train`` against ``transformers.Trainer`` and a plain
                   loop on the 1B shape (QLoRA)
switching          ``lora_lab.set_adapter`` latency against peft's, with a logit oracle; and
                   lora_lab's stacked mixed-adapter batch against peft's ``adapter_names=``
compile            ``TrainSpec(compile=True)`` on builtin:tiny in each precision: dynamo captured
                   the layers, and the losses match the eager run's (5%)
=================  ==========================================================================

Modes::

    python scripts/gpu_check.py --dry-run              # any machine: the checks, what each needs
    python scripts/gpu_check.py --cpu-smoke OUT_DIR    # CPU: every check at tiny sizes (CI)
    python scripts/gpu_check.py OUT_DIR                # on a CUDA GPU: the real run (<= 8 min)

Packages: the GPU machine may lack bitsandbytes and datasets (and has no network).  Wheels in
``--wheels DIR`` (default ``.whl`` in the repo root, filled by ``scripts/fetch_gpu_wheels.sh``) are
installed for the packages that are missing, with ``pip install --no-index --no-deps --target``, and
put first on ``sys.path``.  Only ``export_accelerate`` needs datasets (the exported script imports
it); the rest needs torch, transformers, peft, accelerate and bitsandbytes.  lora_lab is imported
from this checkout, not installed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

for _k, _v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"),
               ("TOKENIZERS_PARALLELISM", "false"), ("PYTHONUNBUFFERED", "1")):
    os.environ.setdefault(_k, _v)

REPO = Path(__file__).resolve().parent.parent
SCHEMA = "lora_lab.gpu_check/1"
SUMMARY_FILE = "gpu_check.json"
DEFAULT_BUDGET_S = 480.0
SITE_DIR = Path(tempfile.gettempdir()) / "lora_lab_gpu_site"
STATUSES = ("pass", "fail", "error", "skipped", "info")
# import name -> why the checks may need it (the packages the dry run reports)
PACKAGES = {
    "torch": "everything", "transformers": "models, Trainer", "peft": "adapters",
    "accelerate": "accelerate launch, Trainer", "bitsandbytes": "4-bit base, 8-bit/paged optimizers",
    "datasets": "the exported train.py", "pandas": "lora_lab's tables", "scipy": "lora_lab (LoftQ)",
    "plotly": "optional: the dashboard's figure", "ipywidgets": "not needed", "anywidget": "not needed",
}


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class Check:
    name: str
    func: Callable
    needs: tuple[str, ...]
    budget_s: float          # the most this check may take on the GPU
    what: str


CHECKS: list[Check] = []


def check(needs: tuple[str, ...], budget_s: float):
    """Register a check function (in order of value); its docstring's first line says what it does."""
    def register(func):
        CHECKS.append(Check(func.__name__.removeprefix("check_"), func, ("torch", *needs), budget_s,
                            (func.__doc__ or "").strip().splitlines()[0]))
        return func
    return register


class CheckTimeout(BaseException):
    """Raised by the alarm when a check outlives its budget (a BaseException: no library's
    ``except Exception`` swallows it)."""


@contextlib.contextmanager
def time_limit(seconds: float):
    def on_alarm(signum, frame):
        raise CheckTimeout(f"over its time limit of {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ----------------------------------------------------------------------------- sizes per mode
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                max_position_embeddings=131072, rms_norm_eps=1e-5)   # RoPE θ left default: shapes only
LLAMA_MINI = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=512, tie_word_embeddings=True,
                  max_position_embeddings=512, rms_norm_eps=1e-5)
# memory planner setups: (method, precision, batch, seq_len, gradient checkpointing)
MEMORY_SETUPS = (("LoRA", "bf16", 4, 512, False), ("LoRA", "bf16", 4, 512, True),
                 ("QLoRA", "bf16", 4, 512, False), ("QLoRA", "bf16", 4, 512, True),
                 ("QLoRA", "bf16", 8, 1024, True), ("QLoRA", "fp16", 4, 512, False),
                 ("LoRA", "bf16", 2, 1024, False), ("QLoRA", "bf16", 1, 256, False))


@dataclass(frozen=True)
class Sizes:
    """How big each check runs: the real run on a GPU, or a smoke run on the CPU."""

    big_name: str
    big: dict
    train_steps: int = 24
    train_batch: int = 8
    big_lr: float = 2e-3                 # the random-weight model learns at this LoRA rate
    memory_setups: tuple = MEMORY_SETUPS
    memory_steps: int = 3
    tput_batch: int = 8
    tput_seq: int = 512
    tput_warmup: int = 3
    tput_steps: int = 13
    switch_adapters: int = 4
    switch_reps: int = 20
    export_steps: int = 6
    bnb_side: int = 4096


GPU_SIZES = Sizes("llama-3.2-1b-shape", LLAMA_1B)
CPU_SIZES = Sizes("llama-mini", LLAMA_MINI, train_steps=6, train_batch=4, big_lr=2e-2,
                  memory_setups=(("LoRA", "fp32", 2, 32, False), ("QLoRA", "fp32", 2, 32, True)),
                  memory_steps=2, tput_batch=2, tput_seq=32, tput_warmup=1, tput_steps=3,
                  switch_adapters=2, switch_reps=5, export_steps=2, bnb_side=512)


@dataclass
class Ctx:
    """What the checks share: the device, sizes, a scratch folder and the built 1B-shaped model."""

    device: str
    sizes: Sizes
    tmp: Path
    deadline: float
    cache: dict = field(default_factory=dict)
    partial: dict = field(default_factory=dict)   # a check's results so far (kept on a timeout)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def precisions(self) -> list[str]:
        """fp16 (as on a T4) and, where native, bf16; fp32 on the CPU."""
        if not self.cuda:
            return ["fp32"]
        import torch

        return ["fp16", "bf16"] if torch.cuda.get_device_capability()[0] >= 8 else ["fp16"]

    def native(self) -> str:
        return self.precisions()[-1]


# ----------------------------------------------------------------------------- helpers
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def expect(failures: list, ok: bool, what: str) -> bool:
    if not ok:
        failures.append(what)
    return bool(ok)


def verdict(failures: list, **details) -> dict:
    return {"status": "fail" if failures else "pass", **({"failed": failures} if failures else {}),
            **details}


def rnd(x, n: int = 4):
    if isinstance(x, float):
        return None if not math.isfinite(x) else float(f"{x:.{n}g}")
    return x


def sync(ctx: Ctx) -> None:
    if ctx.cuda:
        import torch

        torch.cuda.synchronize()


def free_memory(ctx: Ctx) -> None:
    gc.collect()
    if ctx.cuda:
        import torch

        torch.cuda.empty_cache()


def load(ctx: Ctx, source, method: str = "QLoRA", precision: str | None = None):
    """``lora_lab.load_model`` on the check's device: NF4 for QLoRA, full precision for LoRA."""
    import torch

    import lora_lab as ll

    dtype = DTYPES[precision or ctx.native()]
    quant = ll.QuantSpec(compute_dtype=dtype) if method == "QLoRA" else None
    torch.manual_seed(0)              # the adapters attached next start the same in every run
    return ll.load_model(str(source), quant=quant, device=ctx.device, dtype=dtype)


def big_model(ctx: Ctx) -> Path:
    """A saved Llama of the 1B shape (random weights, bf16; fp32 on the CPU) with the builtin
    tokenizer: built once per run, on the device, never from the hub."""
    if "big" in ctx.cache:
        return ctx.cache["big"]
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from lora_lab.hf.model.builtin import TOKENIZER_DIR

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    cfg = LlamaConfig(**ctx.sizes.big, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    folder = ctx.tmp / ctx.sizes.big_name
    torch.manual_seed(0)
    with torch.device(ctx.device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if ctx.cuda else torch.float32)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    n = sum(p.numel() for p in model.parameters())
    del model
    free_memory(ctx)
    ctx.cache["big"] = folder
    ctx.cache["big_info"] = {"params": n, "build_s": rnd(time.perf_counter() - t0, 3)}
    log(f"built {ctx.sizes.big_name}: {n / 1e9:.3f} B parameters in {time.perf_counter() - t0:.1f} s")
    return folder


def task_data(tok, task: str, n: int, seed: int = 0):
    """Tokenized rows of a builtin task: through ``prepare_dataset`` when datasets is importable,
    else through the same preparation without it (``prepare_dataset`` returns a datasets.Dataset)."""
    import lora_lab as ll

    spec = ll.DataSpec(eval_fraction=0.0, max_length=64, seed=seed)
    if importlib.util.find_spec("datasets") is not None:
        return ll.prepare_dataset(ll.builtin_task(task, n=n, seed=seed), tok, spec), "prepare_dataset"
    from lora_lab.hf.data.prepare import _examples
    from lora_lab.hf.data.tasks import sample_examples

    pairs = sample_examples(task, n, seed)
    cols = {"prompt": [p for p, _ in pairs], "response": [r for _, r in pairs]}
    rows = _examples(cols, tok, spec, "train")[0]
    return rows, "lora_lab.hf.data.prepare._examples (no datasets)"


def random_rows(vocab: int, n: int, seq: int, seed: int = 0) -> list[dict]:
    """``n`` unpadded rows of ``seq`` random token ids, every label supervised."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, seq), generator=g).tolist()
    return [{"input_ids": x, "attention_mask": [1] * seq, "labels": list(x)} for x in ids]


def losses_fall(losses: list[float]) -> tuple[bool, bool, float, float]:
    """(all finite, falls, mean of the first k, mean of the last k), k = a quarter of the steps."""
    k = max(1, len(losses) // 4)
    first, last = statistics.fmean(losses[:k]), statistics.fmean(losses[-k:])
    finite = all(math.isfinite(x) for x in losses)
    return finite, finite and last < first, first, last


def randomize_lora_b(model, std: float = 0.02, seed: int = 0) -> None:
    """Give every LoRA B a random value (B = 0 at init would make any merge trivially exact)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def run_dir(ctx: Ctx, name: str) -> str:
    return str(ctx.tmp / "runs" / name)


# ----------------------------------------------------------------------------- checks
@check((), 20)
def check_env(ctx: Ctx) -> dict:
    """torch, CUDA, the GPU, its compute capability and the precision lora_lab picks there."""
    import torch

    from lora_lab.hf.model.device import bf16_supported, default_compute_dtype
    from lora_lab.train.optim import resolve_precision

    failures: list = []
    dev = torch.device(ctx.device)
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
           "device": ctx.device, "lora_lab_compute_dtype": str(default_compute_dtype(ctx.device)),
           "lora_lab_train_precision": resolve_precision("auto", dev).name,
           "imported_from": {n: str(Path(importlib.util.find_spec(n).origin).parent.parent)
                             for n in ("torch", "lora_lab", "bitsandbytes", "datasets") if present(n)}}
    if ctx.cuda:
        props = torch.cuda.get_device_properties(dev)
        cap = torch.cuda.get_device_capability(dev)
        want = "bf16" if cap[0] >= 8 else "fp16"
        out.update(gpu=props.name, capability=f"{cap[0]}.{cap[1]}",
                   memory_gib=rnd(props.total_memory / 2**30), multiprocessors=props.multi_processor_count,
                   lora_lab_bf16_supported=bf16_supported(ctx.device),
                   torch_is_bf16_supported=torch.cuda.is_bf16_supported(),  # True on a T4 (emulated)
                   cudnn=torch.backends.cudnn.version())
        expect(failures, out["lora_lab_train_precision"] == want,
               f"precision {out['lora_lab_train_precision']} on sm_{cap[0]}{cap[1]}, want {want}")
        expect(failures, out["lora_lab_compute_dtype"] == f"torch.{DTYPES[want]}",
               f"compute dtype {out['lora_lab_compute_dtype']}, want {DTYPES[want]}")
    else:
        expect(failures, out["lora_lab_train_precision"] == "fp32", "CPU precision is not fp32")
    return verdict(failures, **out)


@check(("bitsandbytes",), 30)
def check_bnb_4bit(ctx: Ctx) -> dict:
    """bitsandbytes' 4-bit kernels on the device: N(0,1) error vs the published figures and the CPU."""
    import bitsandbytes.functional as F
    import torch

    import lora_lab as ll

    failures: list = []
    n = ctx.sizes.bnb_side
    w = torch.randn(n, n, generator=torch.Generator().manual_seed(0))
    out = {"shape": [n, n]}
    for qt, published in (("nf4", 0.073), ("fp4", 0.097)):   # bitsandbytes' mean |error| at blocksize 64
        row = {}
        for where in dict.fromkeys([ctx.device, "cpu"]):
            x = w.to(where)
            sync(ctx)
            t0 = time.perf_counter()
            q, state = F.quantize_4bit(x, blocksize=64, quant_type=qt)
            back = F.dequantize_4bit(q, state)
            sync(ctx)
            row[f"{where.split(':')[0]}_ms"] = rnd((time.perf_counter() - t0) * 1e3, 3)
            row[f"{where.split(':')[0]}_mean_abs_err"] = rnd(float((back.float() - x).abs().mean()))
            row.setdefault("dequantized", []).append(back.float().cpu())
        dev_err = row[f"{ctx.device.split(':')[0]}_mean_abs_err"]
        deq = row.pop("dequantized")
        row["device_vs_cpu_max_abs"] = rnd(float((deq[0] - deq[-1]).abs().max()))
        row["device_vs_cpu_differing_share"] = rnd(float((deq[0] != deq[-1]).float().mean()))
        expect(failures, abs(dev_err / published - 1) < 0.05,
               f"{qt} error {dev_err} vs published {published}")
        expect(failures, row["device_vs_cpu_differing_share"] < 1e-3,
               f"{qt}: device and CPU kernels disagree on {row['device_vs_cpu_differing_share']} of values")
        out[qt] = row
    qe = ll.quant_error(w.to(ctx.device), "nf4", blocksize=64, double_quant=True)
    out["ll_quant_error_nf4_dq"] = {k: rnd(v) for k, v in vars(qe).items() if isinstance(v, float)}
    return verdict(failures, **out)


def _train_one(ctx: Ctx, source, precision: str, steps: int, lr: float, label: str) -> dict:
    import lora_lab as ll

    model, tok = load(ctx, source, "QLoRA", precision)
    model = ll.attach(model, ll.AdapterSpec(r=8))
    data, data_path = task_data(tok, "reverse", steps * ctx.sizes.train_batch)
    if ctx.cuda:
        import torch

        torch.cuda.reset_peak_memory_stats()
    res = ll.train(model, tok, data, spec=ll.TrainSpec(
        steps=steps, batch_size=ctx.sizes.train_batch, lr=lr, schedule="constant", precision=precision,
        output_dir=run_dir(ctx, label)))
    losses = [float(x) for x in res.loss]
    finite, falls, first, last = losses_fall(losses)
    h = res.history[res.history.event == "step"]
    row = {"precision": res.final["precision"], "steps": res.steps, "loss_first": rnd(first),
           "loss_last": rnd(last), "finite": finite, "falls": falls, "data": data_path,
           "tokens_per_s": rnd(res.final["tokens_per_s"]), "optimizer": res.final["optimizer"]}
    if ctx.cuda:  # what the dashboard's memory panel plots: CUDA allocated and reserved per step
        alloc, reserved = h.cuda_allocated_mb.astype(float), h.cuda_reserved_mb.astype(float)
        row.update(peak_allocated_mb=rnd(res.final.get("peak_cuda_allocated_mb")),
                   dashboard_memory_from_cuda=bool(alloc.notna().all() and reserved.notna().all()
                                                   and (reserved >= alloc).all() and (alloc > 0).all()))
    else:
        row["dashboard_memory_from_rss"] = bool(h.rss_mb.notna().all() and h.cuda_allocated_mb.isna().all())
    row["dashboard_arrays"] = _dashboard_arrays(res.history, ctx.cuda)
    del model
    free_memory(ctx)
    return row


def _dashboard_arrays(history, cuda: bool):
    """The dashboard's own memory series (``lora_lab.viz.training.run_arrays``), when plotly (which
    that module imports) is here; else None."""
    if importlib.util.find_spec("plotly") is None:
        return None
    from lora_lab.viz.training import run_arrays

    a = run_arrays(history)
    return {"memory_points": int(a["memory"].size), "reserved_points": int(a["memory_reserved"].size),
            "reserved_series_matches_device": bool(a["memory_reserved"].size > 0) == cuda}


@check(("bitsandbytes", "transformers", "peft"), 110)
def check_qlora_train(ctx: Ctx) -> dict:
    """QLoRA (NF4) training of builtin:tiny and the 1B shape in fp16 (as on a T4) and bf16."""
    failures: list = []
    runs = ctx.partial.setdefault("runs", {})
    sources = {"builtin:tiny": ("builtin:tiny", 3e-3, ctx.sizes.train_steps),
               ctx.sizes.big_name: (None, ctx.sizes.big_lr, ctx.sizes.train_steps)}
    for name, (source, lr, steps) in sources.items():
        for precision in ctx.precisions():
            src = source or big_model(ctx)
            row = _train_one(ctx, src, precision, steps, lr, f"qlora-{name}-{precision}")
            runs[f"{name} {precision}"] = row
            log(f"qlora_train {name} {precision}: loss {row['loss_first']} -> {row['loss_last']}, "
                f"{row['tokens_per_s']} tokens/s")
            key = f"{name} {precision}"
            expect(failures, row["precision"] == precision, f"{key}: trained in {row['precision']}")
            expect(failures, row["finite"], f"{key}: a loss is not finite")
            expect(failures, row["falls"], f"{key}: the loss does not fall")
            dash = row.get("dashboard_memory_from_cuda", row.get("dashboard_memory_from_rss"))
            expect(failures, dash, f"{key}: the dashboard's memory series are wrong")
    return verdict(failures, runs=runs, big_model=ctx.cache.get("big_info"))


@check(("bitsandbytes", "transformers", "peft"), 150)
def check_memory_planner(ctx: Ctx) -> dict:
    """``estimate_memory`` vs ``torch.cuda.max_memory_reserved()`` for 8 LoRA/QLoRA setups (±15%)."""
    import torch

    import lora_lab as ll
    from lora_lab.specs import TrainSpec

    folder = big_model(ctx)
    spec = ll.AdapterSpec(r=16)
    chunked = [f for f in TrainSpec.__dataclass_fields__ if "chunk" in f]
    rows, failures = ctx.partial.setdefault("setups", []), []
    gib = (torch.cuda.get_device_properties(0).total_memory / 2**30) if ctx.cuda else 64
    precisions = ctx.precisions()
    for method, precision, batch, seq, ckpt in ctx.sizes.memory_setups:
        precision = precision if precision in precisions or not ctx.cuda else precisions[-1]
        quant = ll.QuantSpec(compute_dtype=DTYPES[precision]) if method == "QLoRA" else None
        est = ll.estimate_memory(str(folder), spec, quant=quant, batch_size=batch, seq_len=seq,
                                 gradient_checkpointing=ckpt, optimizer="adamw", device=round(gib),
                                 padded=False, precision=precision)
        row = {"method": method, "precision": precision, "batch": batch, "seq": seq,
               "checkpointing": ckpt, "chosen": est.chosen,
               "est_reserved_gib": rnd(est.peak_reserved() / 2**30),
               "est_allocated_gib": rnd(est.peak_allocated() / 2**30)}
        rows.append(row)
        if ctx.cuda:
            free, _ = torch.cuda.mem_get_info()
            if est.need() > 0.9 * free:
                row["skipped"] = f"estimate {est.need() / 2**30:.1f} GiB > 90% of free {free / 2**30:.1f} GiB"
                continue
        model, tok = load(ctx, folder, method, precision)
        model = ll.attach(model, spec, gradient_checkpointing=ckpt)
        data = random_rows(model.config.vocab_size, batch * ctx.sizes.memory_steps, seq)
        free_memory(ctx)
        if ctx.cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        ll.train(model, tok, data, spec=ll.TrainSpec(
            steps=ctx.sizes.memory_steps, batch_size=batch, lr=1e-4, schedule="constant",
            precision=precision, gradient_checkpointing=ckpt, output_dir=run_dir(ctx, f"memory-{len(rows)}")))
        row["train_s"] = rnd(time.perf_counter() - t0, 3)
        if ctx.cuda:
            reserved, allocated = torch.cuda.max_memory_reserved(), torch.cuda.max_memory_allocated()
            row.update(measured_reserved_gib=rnd(reserved / 2**30),
                       measured_allocated_gib=rnd(allocated / 2**30),
                       ratio_reserved=rnd(est.peak_reserved() / reserved),
                       ratio_allocated=rnd(est.peak_allocated() / allocated))
            row["within_15pct"] = abs(row["ratio_reserved"] - 1) <= 0.15
            expect(failures, row["within_15pct"], f"{method} {precision} b{batch} s{seq} ckpt={ckpt}: "
                   f"estimate/measured reserved = {row['ratio_reserved']}")
            log(f"memory {method} {precision} b{batch}x{seq} ckpt={ckpt}: est {row['est_reserved_gib']} "
                f"GiB, measured {row['measured_reserved_gib']} GiB (ratio {row['ratio_reserved']})")
        del model
        free_memory(ctx)
    measured = [r for r in rows if "ratio_reserved" in r]
    notes = {"target": "estimate / measured max_memory_reserved within ±15%",
             "chunked_loss": (f"TrainSpec fields {chunked}: not yet measured here" if chunked
                              else "lora_lab has no chunked loss yet: no setup to measure")}
    if not ctx.cuda:
        return {"status": "info", "reason": "CPU: estimates and the training path only; the ratios "
                "need torch.cuda's memory statistics", "setups": rows, **notes}
    expect(failures, len(measured) >= 6, f"only {len(measured)} setups measured (want >= 6)")
    within = f"{sum(r['within_15pct'] for r in measured)}/{len(measured)}"
    return verdict(failures, setups=rows, within=within, **notes)


def _probe(model, ids):
    from lora_lab.hf.adapters.merge import probe_logits

    return probe_logits(model, ids)


@check(("bitsandbytes", "transformers", "peft"), 60)
def check_merge(ctx: Ctx) -> dict:
    """Merges on CUDA with the logit check: LoRA fp32 and 16-bit in place, QLoRA through a copy."""
    import peft

    import lora_lab as ll
    from lora_lab.hf.adapters.merge import logit_gap, make_probe_ids, merge_checked

    failures: list = []
    out = ctx.partial
    # 1. LoRA on an fp32 builtin:tiny on the device: merged_copy (a deep copy merged there)
    model, _ = ll.load_model("builtin:tiny", device=ctx.device, dtype="float32")
    model = ll.attach(model, ll.AdapterSpec(r=8))
    randomize_lora_b(model)
    merged, report = ll.merged_copy(model)
    dev = str(next(merged.parameters()).device)
    out["lora_fp32_merged_copy"] = {"rel_logit_diff": rnd(report.rel_logit_diff), "merged_on": dev}
    expect(failures, report.rel_logit_diff < 1e-5, f"fp32 merged_copy logits {report.rel_logit_diff} off")
    expect(failures, dev.startswith(ctx.device.split(":")[0]), f"merged_copy merged on {dev}")
    del merged, model
    # 2. LoRA on the 1B shape in its native 16-bit dtype: merge_checked in place, then unmerge
    precision = ctx.native()
    model, _ = load(ctx, big_model(ctx), "LoRA", precision)
    model = ll.attach(model, ll.AdapterSpec(r=8))
    randomize_lora_b(model, std=0.01)
    ids = make_probe_ids(model, n=2, length=32)
    sync(ctx)
    t0 = time.perf_counter()
    report, before = merge_checked(model, probe_ids=ids)
    sync(ctx)
    merge_s = time.perf_counter() - t0
    ll.unmerge_adapter(model)
    back = logit_gap(before, _probe(model, ids))
    tol = 1e-5 if precision == "fp32" else 5e-2      # 16-bit: W + ΔW is rounded to bf16/fp16
    out[f"lora_{precision}_in_place"] = {"rel_logit_diff": rnd(report.rel_logit_diff),
                                         "unmerge_rel_diff": rnd(back.rel), "merge_check_s": rnd(merge_s, 3),
                                         "tolerance": tol}
    expect(failures, report.rel_logit_diff < tol, f"{precision} in-place merge {report.rel_logit_diff} off")
    expect(failures, back.rel < tol, f"{precision} unmerge {back.rel} off")
    del model
    free_memory(ctx)
    # 3. QLoRA (NF4) builtin:tiny: merged_copy reloads the base in full precision; oracle: that
    # full-precision base with the same adapter, unmerged
    model, _ = load(ctx, "builtin:tiny", "QLoRA", ctx.native())
    model = ll.attach(model, ll.AdapterSpec(r=8))
    randomize_lora_b(model)
    ids = make_probe_ids(model)
    merged, report = ll.merged_copy(model, probe_ids=ids)
    base, _ = ll.load_model("builtin:tiny", device="cpu", dtype="float32")
    oracle = peft.get_peft_model(base, copy.deepcopy(model.peft_config["default"]))
    peft.set_peft_model_state_dict(oracle, peft.get_peft_model_state_dict(model))
    exact = logit_gap(_probe(oracle, ids), _probe(merged, ids))
    out["qlora_merged_copy"] = {"quantization_gap_rel": rnd(report.rel_logit_diff),
                                "from_quantized": report.from_quantized,
                                "vs_unmerged_fp32_rel": rnd(exact.rel)}
    expect(failures, report.from_quantized, "merged_copy did not see a quantized base")
    expect(failures, report.rel_logit_diff < 0.5, f"QLoRA merge gap {report.rel_logit_diff} (repacking bug?)")
    expect(failures, exact.rel < 1e-5, f"merged QLoRA copy vs fp32 unmerged oracle {exact.rel} off")
    del model, merged, oracle
    return verdict(failures, **out)


@check(("bitsandbytes", "transformers", "peft"), 60)
def check_paged_optimizer(ctx: Ctx) -> dict:
    """``paged_adamw_8bit``, ``adamw_8bit`` and ``paged_adamw`` through ``lora_lab.train`` (QLoRA)."""
    import lora_lab as ll
    from lora_lab.errors import TrainingError

    failures: list = []
    out = ctx.partial
    # the 1B shape on a GPU: bitsandbytes keeps 32-bit states for tensors under 4,096 values, which
    # is every LoRA factor of builtin:tiny (8 x 128), so only a big model runs the 8-bit path
    source, lr = (big_model(ctx), ctx.sizes.big_lr) if ctx.cuda else ("builtin:tiny", 3e-3)
    for opt in ("paged_adamw_8bit", "adamw_8bit", "paged_adamw"):
        model, tok = load(ctx, source, "QLoRA")
        model = ll.attach(model, ll.AdapterSpec(r=8))
        data, _ = task_data(tok, "reverse", ctx.sizes.train_steps * ctx.sizes.train_batch)
        spec = ll.TrainSpec(steps=ctx.sizes.train_steps, batch_size=ctx.sizes.train_batch, lr=lr,
                            schedule="constant", optimizer=opt, output_dir=run_dir(ctx, f"opt-{opt}"))
        if not ctx.cuda:    # bitsandbytes' optimizers are CUDA-only: lora_lab must refuse them here
            try:
                ll.train(model, tok, data, spec=spec)
                out[opt] = {"refused_on_cpu": False}
            except TrainingError as exc:
                out[opt] = {"refused_on_cpu": True, "message": exc.problem[:120]}
            expect(failures, out[opt]["refused_on_cpu"], f"{opt} was not refused on the CPU")
            continue
        res = ll.train(model, tok, data, spec=spec)
        finite, falls, first, last = losses_fall([float(x) for x in res.loss])
        out[opt] = {"optimizer": res.final["optimizer"], "loss_first": rnd(first), "loss_last": rnd(last),
                    "tokens_per_s": rnd(res.final["tokens_per_s"])}
        expect(failures, finite and falls, f"{opt}: loss {first} -> {last}")
        del model
        free_memory(ctx)
    return verdict(failures, model=str(Path(str(source)).name), **out)


@check(("bitsandbytes", "transformers", "peft", "accelerate", "datasets"), 100)
def check_export_accelerate(ctx: Ctx) -> dict:
    """The exported ``train.py`` under ``accelerate launch`` for a few steps; its adapter loads back."""
    import torch

    import lora_lab as ll
    from lora_lab.hf.adapters.merge import make_probe_ids
    from lora_lab.hf.adapters.switch import disabled_adapters
    from lora_lab.hf.data.tasks import sample_examples

    failures: list = []
    spec, steps = ll.AdapterSpec(r=8), ctx.sizes.export_steps
    quant = ll.QuantSpec(compute_dtype=DTYPES[ctx.native()])
    rows = [{"prompt": p, "response": r} for p, r in sample_examples("reverse", 200, 0)]
    folder, outputs = ctx.tmp / "export", ctx.tmp / "export-outputs"
    exported = ll.export_script(spec, quant, ll.TrainSpec(steps=steps, batch_size=8, lr=3e-3),
                                ll.DataSpec(max_length=64), model_id="builtin:tiny", path=folder, data=rows)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(exported.file("accelerate/single_gpu.yaml")), "--main_process_port", str(port),
           str(exported.file("train.py")), "--steps", str(steps), "--output-dir", str(outputs)]
    if not ctx.cuda:
        cmd.append("--cpu")
    env = dict(os.environ, HF_DATASETS_CACHE=str(ctx.tmp / "hf-datasets"))   # PYTHONPATH: the wheels
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True,
                          timeout=max(10.0, ctx.deadline - time.time() - 5))
    losses = [float(x) for x in re.findall(r"^step \d+/\d+  loss ([0-9.e+-]+|nan|inf)", proc.stdout, re.M)]
    done = re.findall(r"^rank 0 of \d+: .*$", proc.stdout, re.M)
    out = {"command": " ".join(cmd[1:]), "returncode": proc.returncode,
           "seconds": rnd(time.perf_counter() - t0, 3), "losses": [rnd(x) for x in losses],
           "final_line": done[-1] if done else None,
           "stdout_tail": "\n".join(proc.stdout.strip().splitlines()[-6:])[-1200:]}
    if proc.returncode:
        out["stderr_tail"] = proc.stderr.strip()[-2000:]
    ok = expect(failures, proc.returncode == 0, f"accelerate launch exited {proc.returncode}")
    expect(failures, len(losses) == steps and all(math.isfinite(x) for x in losses),
           f"{len(losses)} finite losses logged, want {steps}")
    adapter = outputs / "adapter"
    if ok and expect(failures, (adapter / "adapter_config.json").exists(), "no adapter saved"):
        from lora_lab.hf.adapters.io import read_adapter_spec

        model, _ = load(ctx, "builtin:tiny", "QLoRA")
        model = ll.load_adapter(model, adapter)
        ids = make_probe_ids(model)
        with_adapter = _probe(model, ids)
        with disabled_adapters(model):
            base = _probe(model, ids)
        moved = float((with_adapter - base).abs().max())
        out.update(adapter_spec_equal=read_adapter_spec(adapter) == spec, adapter_logit_change=rnd(moved),
                   loaded_on=str(next(model.parameters()).device))
        expect(failures, out["adapter_spec_equal"], "the saved AdapterSpec differs")
        expect(failures, moved > 0 and bool(torch.isfinite(with_adapter).all()),
               "the loaded adapter changes nothing")
    return verdict(failures, **out)


def _plain_loop(ctx: Ctx, model, rows, steps, precision) -> list[float]:
    import torch

    from lora_lab.hf.data.prepare import pad_batch

    b = ctx.sizes.tput_batch
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    model.train()
    times = []
    for step in range(steps):
        batch = {k: v.to(ctx.device) for k, v in pad_batch(rows[step * b:(step + 1) * b], 0).items()}
        with torch.autocast(ctx.device.split(":")[0], dtype=dtype, enabled=dtype is not None):
            loss = model(**batch, use_cache=False).loss
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss)
        sync(ctx)
        times.append(time.perf_counter())
    return times


def _trainer(ctx: Ctx, model, tok, rows, steps, precision) -> list[float]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    times = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            sync(ctx)
            times.append(time.perf_counter())

    args = TrainingArguments(
        output_dir=str(ctx.tmp / "trainer"), max_steps=steps,
        per_device_train_batch_size=ctx.sizes.tput_batch, learning_rate=1e-4,
        lr_scheduler_type="constant", report_to=[], save_strategy="no",
        eval_strategy="no", logging_steps=steps, disable_tqdm=True, dataloader_num_workers=0, seed=0,
        optim="adamw_torch_fused", bf16=precision == "bf16", fp16=precision == "fp16",
        use_cpu=not ctx.cuda, remove_unused_columns=False, max_grad_norm=1.0)
    Trainer(model=model, args=args, train_dataset=rows, processing_class=tok, callbacks=[Clock()]).train()
    return times


@check(("bitsandbytes", "transformers", "peft", "accelerate"), 100)
def check_throughput(ctx: Ctx) -> dict:
    """tokens/s of ``lora_lab.train`` vs ``transformers.Trainer`` and a plain loop (1B shape, QLoRA)."""
    import lora_lab as ll

    sz, precision = ctx.sizes, ctx.native()
    steps, warm = sz.tput_steps, sz.tput_warmup
    model, tok = load(ctx, big_model(ctx), "QLoRA", precision)
    model = ll.attach(model, ll.AdapterSpec(r=16))
    rows = random_rows(model.config.vocab_size, steps * sz.tput_batch, sz.tput_seq)

    def lora_lab_train(model, rows, steps) -> list[float]:
        times = []

        class Clock:
            def on_step(self, state, control):
                times.append(time.perf_counter())

        ll.train(model, tok, rows, spec=ll.TrainSpec(
            steps=steps, batch_size=sz.tput_batch, lr=1e-4, schedule="constant", precision=precision,
            output_dir=run_dir(ctx, "throughput")), callbacks=[Clock()])
        return times

    setups = {"plain": lambda: _plain_loop(ctx, model, rows, steps, precision),
              "lora_lab": lambda: lora_lab_train(model, rows, steps),
              "trainer": lambda: _trainer(ctx, model, tok, rows, steps, precision)}
    rates = ctx.partial.setdefault("tokens_per_s", {})
    for name, run in setups.items():
        times = run()
        rates[name] = rnd((len(times) - warm) * sz.tput_batch * sz.tput_seq / (times[-1] - times[warm - 1]))
        log(f"throughput {name}: {rates[name]} tokens/s")
    failures: list = []
    vs_plain, vs_trainer = rates["lora_lab"] / rates["plain"], rates["lora_lab"] / rates["trainer"]
    expect(failures, vs_plain >= 0.95, f"lora_lab.train at {vs_plain:.3f}x the plain loop (want >= 0.95)")
    model = None
    free_memory(ctx)
    out = dict(tokens_per_s=rates, lora_lab_vs_plain=rnd(vs_plain), lora_lab_vs_trainer=rnd(vs_trainer),
               precision=precision,
               setup=f"batch {sz.tput_batch} x {sz.tput_seq}, {steps - warm} timed steps after {warm}")
    if not ctx.cuda:    # a tiny model on a shared CPU: the code path, not the speed
        return {"status": "info", "reason": "CPU smoke: timings are not judged", **out}
    return verdict(failures, **out)


def _median_ms(fn, reps: int, ctx: Ctx) -> float:
    out = []
    for i in range(reps):
        sync(ctx)
        t0 = time.perf_counter()
        fn(i)
        sync(ctx)
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


@check(("transformers", "peft"), 50)
def check_switching(ctx: Ctx) -> dict:
    """``lora_lab.set_adapter`` latency vs peft's (logit oracle), and peft's mixed-adapter batch."""
    import torch

    import lora_lab as ll
    from lora_lab.hf.adapters.merge import logit_gap, make_probe_ids

    sz, failures = ctx.sizes, []
    model, _ = load(ctx, big_model(ctx), "LoRA", ctx.native())
    names = [f"a{i}" for i in range(sz.switch_adapters)]
    for name in names:
        model = ll.attach(model, ll.AdapterSpec(r=8), name=name)
    randomize_lora_b(model, std=0.01)
    ids = make_probe_ids(model, n=1, length=16)
    ll.set_adapter(model, names[1])
    ours = _probe(model, ids)
    model.set_adapter(names[1])       # peft's own switch: the oracle
    gap = logit_gap(_probe(model, ids), ours).rel
    expect(failures, gap < 1e-6, f"lora_lab.set_adapter and peft's set_adapter differ ({gap:.2e})")
    cycle = names * (sz.switch_reps // len(names) + 1)
    ll.set_adapter(model, names[0])
    ll_ms = _median_ms(lambda i: ll.set_adapter(model, cycle[i + 1]), sz.switch_reps, ctx)
    peft_ms = _median_ms(lambda i: model.set_adapter(cycle[i + 1]), max(3, sz.switch_reps // 2), ctx)
    ll.set_adapter(model, names[0])
    x = ids.to(ctx.device)
    with torch.no_grad():
        fwd_ms = _median_ms(lambda i: model(input_ids=x), 5, ctx)
    expect(failures, ll_ms < peft_ms,
           f"lora_lab switch {ll_ms:.3f} ms not faster than peft's {peft_ms:.3f} ms")
    # mixed-adapter batches: peft's adapter_names= forward (the oracle) and lora_lab's stacked route
    from lora_lab.hf.generate.routing import stack_reason, stacked_lora

    b = max(len(names), 8 if ctx.cuda else 2)
    batch = make_probe_ids(model, n=b, length=64 if ctx.cuda else 16).to(ctx.device)
    mixed = [names[i % len(names)] for i in range(b)]
    model.eval()                      # peft refuses adapter_names= in training mode
    with torch.no_grad():
        peft_logits = model(input_ids=batch, adapter_names=mixed).logits
        mixed_ms = _median_ms(lambda i: model(input_ids=batch, adapter_names=mixed), 5, ctx)
        single_ms = _median_ms(lambda i: model(input_ids=batch), 5, ctx)
        reason = stack_reason(model, mixed)
        expect(failures, reason is None, f"lora_lab cannot stack these adapters: {reason}")
        with stacked_lora(model, mixed):
            stacked_gap = logit_gap(peft_logits, model(input_ids=batch).logits).rel
            stacked_ms = _median_ms(lambda i: model(input_ids=batch), 5, ctx)
    expect(failures, stacked_gap < 1e-3,
           f"lora_lab's stacked mixed batch differs from peft's adapter_names= ({stacked_gap:.2e})")
    tokens = batch.numel()
    model = None
    free_memory(ctx)
    return verdict(failures, adapters=len(names), logit_gap_vs_peft=rnd(gap), lora_lab_switch_ms=rnd(ll_ms),
                   peft_switch_ms=rnd(peft_ms), speedup=rnd(peft_ms / ll_ms), forward_1x16_ms=rnd(fwd_ms),
                   mixed_batch={"lora_lab_stacked_tokens_per_s": rnd(tokens / stacked_ms * 1e3),
                                "lora_lab_stacked_logit_gap_vs_peft": rnd(stacked_gap),
                                "peft_adapter_names_tokens_per_s": rnd(tokens / mixed_ms * 1e3),
                                "single_adapter_tokens_per_s": rnd(tokens / single_ms * 1e3),
                                "batch": list(batch.shape)})


@check(("transformers", "peft"), 90)
def check_compile(ctx: Ctx) -> dict:
    """``TrainSpec(compile=True)`` on builtin:tiny: the eager run's losses (oracle), graphs captured."""
    import lora_lab as ll
    from lora_lab.hf.training.compile import compiler_missing

    missing = compiler_missing("cuda" if ctx.cuda else "cpu")
    if missing:
        return {"status": "skipped", "reason": missing}
    from torch._dynamo.utils import counters

    failures, runs = [], {}
    for precision in ctx.precisions():
        losses = {}
        for compiled in (False, True):
            model, tok = load(ctx, "builtin:tiny", "LoRA", precision)
            model = ll.attach(model, ll.AdapterSpec(r=8))
            data, _ = task_data(tok, "reverse", ctx.sizes.train_steps * ctx.sizes.train_batch)
            before = counters["stats"]["calls_captured"]
            out = run_dir(ctx, f"compile-{precision}-{compiled}")
            res = ll.train(model, tok, data, spec=ll.TrainSpec(
                steps=ctx.sizes.train_steps, batch_size=ctx.sizes.train_batch, lr=3e-3, schedule="constant",
                precision=precision, compile=compiled, output_dir=out))
            losses[compiled] = [float(x) for x in res.loss]
            runs[f"{precision} {'compiled' if compiled else 'eager'}"] = {
                "loss_last": rnd(losses[compiled][-1]), "tokens_per_s": rnd(res.final["tokens_per_s"]),
                "calls_captured": counters["stats"]["calls_captured"] - before}
            model = None
            free_memory(ctx)
        key = f"{precision} compiled"
        expect(failures, runs[key]["calls_captured"] > 0, f"{key}: dynamo captured no graph")
        finite, falls, _, last = losses_fall(losses[True])
        expect(failures, finite and falls, f"{key}: the loss is not finite or does not fall")
        gap = abs(last - losses_fall(losses[False])[3]) / max(abs(last), 1e-9)
        expect(failures, gap < 0.05, f"{key}: the last losses differ from eager's by {gap:.1%}")
    return verdict(failures, runs=runs)


# ----------------------------------------------------------------------------- packages, wheels
def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def present(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def packages() -> dict:
    return {name: (_version(name) or "present") if present(name) else None for name in PACKAGES}


def _wheel_name(path: Path) -> str:
    return path.name.split("-")[0].lower().replace("-", "_")


def wheel_plan(folder: Path) -> dict:
    """The wheels in ``folder`` and which of them this machine lacks (by import name)."""
    wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    return {"dir": str(folder), "files": [w.name for w in wheels],
            "missing_here": [w.name for w in wheels if not present(_wheel_name(w))]}


def install_wheels(folder: Path) -> dict:
    """pip-install (offline, no deps) the wheels whose package is missing, into a folder put first
    on sys.path and on PYTHONPATH (for the subprocesses: accelerate launch)."""
    plan = wheel_plan(folder)
    todo = [folder / f for f in plan["missing_here"]]
    plan["installed"] = []
    if not todo:
        return plan
    SITE_DIR.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--upgrade", "--target", str(SITE_DIR), *map(str, todo)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    plan["install_s"] = rnd(time.perf_counter() - t0, 3)
    if proc.returncode:
        plan["error"] = (proc.stdout + proc.stderr)[-1500:]
        return plan
    sys.path.insert(0, str(SITE_DIR))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(SITE_DIR), os.environ.get("PYTHONPATH")) if p)
    importlib.invalidate_caches()
    plan["installed"] = [w.name for w in todo]
    log(f"installed {', '.join(plan['installed'])} into {SITE_DIR}")
    return plan


# ----------------------------------------------------------------------------- running
def run_check(chk: Check, ctx: Ctx) -> dict:
    row = {"name": chk.name, "what": chk.what, "needs": list(chk.needs)}
    missing = [n for n in chk.needs if not present(n)]
    left = ctx.deadline - time.time()
    ctx.partial = {}
    if missing:
        return {**row, "status": "skipped", "reason": f"missing packages: {', '.join(missing)}"}
    if left < min(0.3 * chk.budget_s, 30):
        return {**row, "status": "skipped", "reason": f"out of time ({left:.0f} s left of the budget)"}
    limit = min(chk.budget_s, left) if ctx.cuda else left
    log(f"{chk.name}: start (limit {limit:.0f} s)")
    t0 = time.perf_counter()
    try:
        with time_limit(limit), contextlib.redirect_stdout(sys.stderr):   # stdout: the JSON only
            result = chk.func(ctx)
    except (Exception, CheckTimeout) as exc:   # noqa: BLE001 - a check's failure is recorded
        tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
        result = {"status": "error", "error": f"{type(exc).__name__}: {str(exc)[:500]}",
                  "traceback": "".join(tb)[-2500:], **({"partial": ctx.partial} if ctx.partial else {})}
    finally:
        with contextlib.suppress(Exception):
            free_memory(ctx)
    result["seconds"] = rnd(time.perf_counter() - t0, 3)
    why = result.get("failed") or result.get("error")
    log(f"{chk.name}: {result['status']} in {result['seconds']} s" + (f" ({why})" if why else ""))
    return {**row, **result}


def summarize(mode: str, started: float, budget: float, rows: list[dict], extra: dict) -> dict:
    counts = {s: sum(r.get("status") == s for r in rows) for s in STATUSES}
    return {"schema": SCHEMA, "mode": mode,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "seconds": rnd(time.time() - started, 4), "budget_s": budget, **extra, "checks": rows,
            "counts": counts, "ok": counts["fail"] == 0 and counts["error"] == 0}


def write(summary: dict, out_dir: Path | None) -> None:
    if out_dir is None:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / (SUMMARY_FILE + ".tmp")
    tmp.write_text(json.dumps(summary, indent=1, default=str))
    tmp.replace(out_dir / SUMMARY_FILE)


def dry_run(args, out_dir: Path | None) -> int:
    started = time.time()
    rows = [{"name": c.name, "what": c.what, "needs": list(c.needs),
             "missing": [n for n in c.needs if not present(n)], "budget_s": c.budget_s,
             "status": "skipped", "reason": "dry run"} for c in CHECKS]
    summary = summarize("dry-run", started, args.budget_s, rows,
                        {"packages": packages(), "wheels": wheel_plan(Path(args.wheels)),
                         "cuda_device_files": sorted(p.name for p in Path("/dev").glob("nvidia[0-9]*"))})
    write(summary, out_dir)
    for r in rows:                    # for people: one line per check on stderr
        miss = f"   missing here: {', '.join(r['missing'])}" if r["missing"] else ""
        needs = ", ".join(r["needs"])
        print(f"{r['name']:<18} {r['budget_s']:>4.0f} s  needs {needs}{miss}", file=sys.stderr)
    wheels = summary["wheels"]
    print(f"wheels in {wheels['dir']}: {', '.join(wheels['files']) or 'none'}; would install here: "
          f"{', '.join(wheels['missing_here']) or 'none'}", file=sys.stderr)
    print(json.dumps(summary, indent=1, default=str))
    return 0


def select(args) -> list[Check]:
    names = [c.name for c in CHECKS]
    for given in (args.only or []) + (args.skip or []):
        if given not in names:
            raise SystemExit(f"unknown check {given!r}; the checks are {', '.join(names)}")
    return [c for c in CHECKS if (not args.only or c.name in args.only) and c.name not in (args.skip or [])]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="checks, in order: " + ", ".join(c.name for c in CHECKS))
    ap.add_argument("out", nargs="?", help="folder for gpu_check.json (default: $OUT when set)")
    ap.add_argument("--dry-run", action="store_true", help="list the checks and what they need; exit 0")
    ap.add_argument("--cpu-smoke", action="store_true", help="run the checks on the CPU at tiny sizes")
    ap.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="global deadline (480 s)")
    ap.add_argument("--wheels", default=str(REPO / ".whl"), help="wheels for missing packages (.whl)")
    ap.add_argument("--only", type=lambda s: s.split(","), help="comma-separated checks to run")
    ap.add_argument("--skip", type=lambda s: s.split(","), help="comma-separated checks to skip")
    args = ap.parse_args(argv)
    out = args.out or os.environ.get("OUT")
    out_dir = Path(out) if out else None
    if args.dry_run:
        return dry_run(args, out_dir)
    started = time.time()
    wheels = install_wheels(Path(args.wheels))
    sys.path.insert(0, str(REPO))     # lora_lab from this checkout, not installed
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; use --dry-run, or --cpu-smoke for the CPU smoke run",
              file=sys.stderr)
        return 2
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    mode = "cpu-smoke" if args.cpu_smoke else "gpu"
    device = "cpu" if args.cpu_smoke else "cuda"
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="lora_lab_gpu_check_") as tmp:
        ctx = Ctx(device=device, sizes=CPU_SIZES if args.cpu_smoke else GPU_SIZES, tmp=Path(tmp),
                  deadline=started + args.budget_s)
        extra = {"device": device, "packages": packages(), "wheels": wheels}
        for chk in select(args):
            rows.append(run_check(chk, ctx))
            write(summarize(mode, started, args.budget_s, rows, extra), out_dir)
    summary = summarize(mode, started, args.budget_s, rows, extra)
    write(summary, out_dir)
    print(json.dumps(summary, indent=1, default=str))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
