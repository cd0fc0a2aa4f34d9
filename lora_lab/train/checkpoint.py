"""Checkpoints: the adapter in peft's format plus what resuming needs, written atomically.

A run folder (``runs/<timestamp>-<adapter>`` by default) holds::

    checkpoint-000040/
        adapter_config.json, adapter_model.safetensors   # peft / vLLM readable (safetensors only)
        lora_lab_spec.json                               # the AdapterSpec, when attach() made it
        training_state.pt                                # tensors and plain containers only
        progress.json                                    # step, reason, last loss (for humans)
    latest                                               # text: the name of the newest checkpoint
    history.csv                                          # the metric history

Each checkpoint is written to a hidden temporary folder and renamed into place, and ``latest`` is
replaced with ``os.replace``; a crash mid-save therefore leaves the previous checkpoint intact.
``training_state.pt`` holds the trainable parameters by name, the optimizer and grad-scaler state,
the step, the random states (CPU, and every CUDA device's when CUDA is available: dropout on a GPU
draws from the CUDA generator, so a resumed GPU run needs it to see the same masks) and the history
rows.  It is read with ``torch.load(weights_only=True)``, so nothing but tensors and primitive
containers is ever unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from ..errors import TrainingError
from ..hf.adapters.io import save_adapter

__all__ = ["save_checkpoint", "load_training_state", "restore_trainable", "resolve_checkpoint",
           "rng_state", "restore_rng_state", "STATE_FILE"]

STATE_FILE = "training_state.pt"
LATEST = "latest"


def _save_adapter(model: nn.Module, path: Path, adapter: str | None) -> None:
    """The adapter in peft's folder format (safetensors), by :func:`lora_lab.save_adapter`."""
    save_adapter(model, path, adapter=adapter)


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name, detached CPU copies (the adapter, nothing frozen)."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()
            if p.requires_grad}


def save_checkpoint(model: nn.Module, run_dir: Path, step: int, state: dict,
                    adapter: str | None = None, keep_last: int = 3) -> Path:
    """Write ``run_dir/checkpoint-<step>`` atomically and return its path.

    ``state`` is the resumable state (optimizer, scaler, history, ...); the trainable parameters
    are added here.  Only the newest ``keep_last`` checkpoints are kept.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"checkpoint-{step:06d}"
    tmp = run_dir / f".checkpoint-{step:06d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _save_adapter(model, tmp, adapter)
        full = {**state, "step": int(step), "trainable": trainable_state(model)}
        torch.save(full, tmp / STATE_FILE)
        summary = {k: state.get(k) for k in ("reason", "loss", "epoch")}
        (tmp / "progress.json").write_text(json.dumps({"step": step, **summary}, indent=2))
        if final.exists():  # re-saving the same step (e.g. Save-now, then the end of the run)
            old = run_dir / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _atomic_text(run_dir / LATEST, final.name)
    _prune(run_dir, keep_last)
    return final


def _prune(run_dir: Path, keep_last: int) -> None:
    ckpts = sorted(p for p in run_dir.glob("checkpoint-*") if p.is_dir())
    for old in ckpts[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def resolve_checkpoint(path) -> Path:
    """A checkpoint folder, or a run folder (its ``latest`` checkpoint), as a checkpoint path."""
    path = Path(path)
    if (path / STATE_FILE).exists():
        return path
    if (path / LATEST).exists():
        ckpt = path / (path / LATEST).read_text().strip()
        if (ckpt / STATE_FILE).exists():
            return ckpt
    ckpts = sorted(p for p in path.glob("checkpoint-*") if (p / STATE_FILE).exists())
    if ckpts:
        return ckpts[-1]
    raise TrainingError(f"resume_from={str(path)!r} holds no lora_lab checkpoint ({STATE_FILE}).",
                        "pass a run folder written by lora_lab.train, or one of its checkpoint-* "
                        "folders")


def rng_state() -> dict:
    """``{"rng": CPU state, "cuda_rng": [one state per CUDA device] or None}``: uint8 tensors, which
    ``torch.load(weights_only=True)`` reads back without unpickling anything else."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return {"rng": torch.get_rng_state(), "cuda_rng": cuda}


def restore_rng_state(saved: dict) -> None:
    """Set the CPU generator, and each CUDA device's that was saved and is present here (a run
    saved on a CPU, or one resumed on fewer GPUs, restores what it can)."""
    torch.set_rng_state(saved["rng"])
    cuda = saved.get("cuda_rng")
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(cuda)[:torch.cuda.device_count()])


def load_training_state(path) -> dict:
    """Read a checkpoint's resumable state (tensors and plain containers only, no pickled code)."""
    ckpt = resolve_checkpoint(path)
    state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
    state["path"] = str(ckpt)
    return state


def restore_trainable(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Copy saved trainable parameters into ``model`` (same adapter config), checking names/shapes."""
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in saved]
    unknown = [n for n in saved if n not in params]
    bad = [f"{n}: saved {tuple(t.shape)} vs model {tuple(params[n].shape)}"
           for n, t in saved.items() if n in params and params[n].shape != t.shape]
    if missing or unknown or bad:
        detail = (bad or unknown or missing)[:3]
        raise TrainingError(f"The checkpoint does not fit this model's adapter ({len(missing)} "
                            f"missing, {len(unknown)} unknown, {len(bad)} mis-shaped parameters; "
                            f"e.g. {detail}).",
                            "attach the same AdapterSpec (same targets and r) before resuming")
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))
