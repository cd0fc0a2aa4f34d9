"""Save and load adapters: peft's folder format, safetensors only, atomic writes.

A saved adapter is a folder with ``adapter_config.json`` and ``adapter_model.safetensors`` (what
peft, vLLM and the hub read) plus ``lora_lab_spec.json`` (the :class:`~lora_lab.AdapterSpec`).  Saving
writes to a temporary sibling folder and renames it into place, so a crash mid-save leaves the last
good adapter.  Loading refuses pickled ``.bin`` files and checks every tensor's shape against the
base model first, so a wrong base gets an error naming the mismatched shapes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from torch import nn

from ..errors import AdapterError, AdapterMismatchError
from ..specs import AdapterSpec

__all__ = ["save_adapter", "load_adapter", "read_adapter_spec"]

SPEC_FILE = "lora_lab_spec.json"


def _active(model) -> str:
    active = getattr(model, "active_adapter", None)
    return active[0] if isinstance(active, (list, tuple)) else active


def save_adapter(model: nn.Module, path, adapter: str | None = None) -> Path:
    """Save ``adapter`` (the active one when None) to folder ``path``, atomically; return the path."""
    import peft

    if not isinstance(model, peft.PeftModel):
        raise AdapterError("This model has no adapter to save.",
                           "attach one first: model = lora_lab.attach(model, spec)")
    adapter = adapter or _active(model)
    if adapter not in model.peft_config:
        raise AdapterError(f"There is no adapter named {adapter!r} to save.",
                           f"pass one of {sorted(model.peft_config)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        model.save_pretrained(tmp, selected_adapters=[adapter], safe_serialization=True)
        src = tmp / adapter if (tmp / adapter / "adapter_config.json").exists() else tmp
        spec = getattr(model, "lora_lab_specs", {}).get(adapter)
        if spec is not None:
            (src / SPEC_FILE).write_text(json.dumps(spec.to_dict(), indent=2))
        _swap_into_place(src, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _swap_into_place(src: Path, dst: Path) -> None:
    """Replace folder ``dst`` by ``src`` with renames only: the old one is removed last."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_adapter_spec(path) -> AdapterSpec:
    """The :class:`AdapterSpec` of a saved adapter (from lora_lab's file, else peft's config)."""
    from peft import PeftConfig

    from .peft_config import spec_from_peft_config

    path = Path(path)
    if (path / SPEC_FILE).exists():
        d = json.loads((path / SPEC_FILE).read_text())
        d["target_modules"] = (tuple(d["target_modules"]) if isinstance(d["target_modules"], list)
                               else d["target_modules"])
        d["layers"] = tuple(d["layers"]) if d.get("layers") else None
        return AdapterSpec(**d)
    return spec_from_peft_config(PeftConfig.from_pretrained(str(path)))


def _check_folder(path: Path) -> None:
    if not (path / "adapter_config.json").exists():
        raise AdapterError(f"{path} is not a saved adapter (no adapter_config.json).",
                           "pass the folder written by lora_lab.save_adapter or peft's save_pretrained")
    if not (path / "adapter_model.safetensors").exists():
        bins = list(path.glob("*.bin"))
        raise AdapterError(
            f"{path} has no adapter_model.safetensors"
            + (" (only a pickled .bin file, which lora_lab never unpickles)" if bins else "") + ".",
            "re-save the adapter as safetensors (peft: save_pretrained(..., safe_serialization=True))")


def _check_shapes(model: nn.Module, path: Path) -> None:
    """Compare each saved LoRA tensor's shape with the base module it will sit on."""
    from safetensors import safe_open

    from .inspect import inspect_model

    table = inspect_model(model).set_index("name")
    bad = []
    with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():
            if ".lora_A." not in key and ".lora_B." not in key:
                continue
            module = key.split(".lora_")[0].removeprefix("base_model.model.")
            shape = tuple(f.get_slice(key).get_shape())
            if module not in table.index:
                bad.append(f"{module}: not in this model")
                continue
            fin, fout = table.at[module, "in_features"], table.at[module, "out_features"]
            want = fin if ".lora_A." in key else fout
            got = shape[1] if ".lora_A." in key else shape[0]
            if got != want:
                bad.append(f"{key}: saved {shape}, base layer is {fin}→{fout}")
    if bad:
        raise AdapterMismatchError(
            f"The adapter in {path} does not fit this base model; {len(bad)} tensors disagree, "
            f"e.g. {'; '.join(bad[:3])}.",
            "load it onto the base model it was trained on (see base_model_name_or_path in "
            "adapter_config.json)")


def load_adapter(model: nn.Module, path, name: str | None = None, *, trainable: bool = False,
                 activate: bool = True) -> nn.Module:
    """Load the adapter saved in ``path`` onto ``model`` under ``name`` (default: the folder name,
    or ``"default"`` for a model without adapters) and return the peft model."""
    import peft

    path = Path(path)
    _check_folder(path)
    spec = read_adapter_spec(path)
    if spec.is_lora:
        _check_shapes(model, path)
    is_peft = isinstance(model, peft.PeftModel)
    name = name or (path.name if is_peft else "default")
    if is_peft and name in model.peft_config:
        raise AdapterError(f"The model already has an adapter named {name!r}.",
                           "pass name='another_name' or delete the old one first")
    try:
        if is_peft:
            model.load_adapter(str(path), adapter_name=name, is_trainable=trainable)
            if activate:
                model.set_adapter(name)
        else:
            model = peft.PeftModel.from_pretrained(model, str(path), adapter_name=name,
                                                   is_trainable=trainable)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise AdapterError(f"peft could not load the adapter in {path}: "
                           f"{str(exc).splitlines()[0]}",
                           "check that it was trained for this base model and method") from exc
    specs = dict(getattr(model, "lora_lab_specs", {}))
    specs[name] = spec
    model.lora_lab_specs = specs
    sources = dict(getattr(model, "lora_lab_sources", {}))
    sources[name] = str(path)
    model.lora_lab_sources = sources
    return model
