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
import warnings
from pathlib import Path

import torch
from torch import nn

from ...errors import AdapterError, AdapterMismatchError
from ...specs import AdapterSpec
from .._peft import PREFIX, active_name, check_adapter_name, is_peft, strip_prefix
from .switch import set_adapter

__all__ = ["adapter_name_for", "load_adapter", "read_adapter_spec", "save_adapter"]

SPEC_FILE = "lora_lab_spec.json"
# Adds to an existing PeftModel, by path taken (tests read it to see which one ran).
_LOAD_PATHS = {"fast": 0, "peft": 0}
# LoraConfig fields that make an adapter more than plain LoRA: any set one sends it to peft's path.
_NOT_PLAIN = ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern", "lora_bias",
              "trainable_token_indices", "layer_replication", "target_parameters",
              "ensure_weight_tying", "use_qalora", "alora_invocation_tokens", "arrow_config",
              "velora_config", "monteclora_config", "kasa_config", "use_bdlora", "megatron_config")


def save_adapter(model: nn.Module, path, adapter: str | None = None) -> Path:
    """Save ``adapter`` (the active one when None) to folder ``path``, atomically; return the path."""
    if not is_peft(model):
        raise AdapterError("This model has no adapter to save.",
                           "attach one first: model = lora_lab.attach(model, spec)")
    adapter = active_name(model, adapter)
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

    bad = []
    with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not iterable
            if ".lora_A." not in key and ".lora_B." not in key:
                continue
            module = strip_prefix(key.split(".lora_")[0])
            shape = tuple(f.get_slice(key).get_shape())
            features = _linear_features(model, module)
            if features is None:
                bad.append(f"{module}: not in this model")
                continue
            fin, fout = features
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


def _linear_features(model: nn.Module, module: str) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of ``module`` when it is a row of
    :func:`~lora_lab.inspect_model` (an adaptable linear layer, not the LM head, not inside a peft
    wrapper), else None.  Found by name, so the cost does not grow with the adapters loaded."""
    from ..model.inspect import OUTPUT_NAMES, base_layer, layer_features, linear_kind, module_type

    if (module_type(module) in OUTPUT_NAMES + ("base_layer",) or ".lora_" in module
            or ".ia3_" in module or not module):
        return None
    full = PREFIX + module if is_peft(model) else module
    node = model
    for part in full.split("."):
        if node is not model:                    # an ancestor that wraps a linear layer hides it
            base = base_layer(node)
            if base is not node and linear_kind(base) is not None:
                return None
        node = node._modules.get(part) if isinstance(node, nn.Module) else None
        if node is None:
            return None
    base = base_layer(node)
    kind = linear_kind(base)
    return None if kind is None else layer_features(base, kind)


def adapter_name_for(path, name: str | None = None) -> str:
    """The name :func:`load_adapter` gives the adapter in folder ``path``: ``name`` when given,
    else the folder's name (``runs/answer/`` → ``"answer"``), checked to be usable as one."""
    if name is not None:
        check_adapter_name(name)
        return name
    folder = Path(os.path.abspath(path)).name
    try:
        check_adapter_name(folder)
    except AdapterError:
        raise AdapterError(f"The folder name {folder!r} of {path} cannot name an adapter (adapter "
                           "names are used as keys of torch ModuleDicts: no dots, not a method "
                           "name such as 'train' or 'to').",
                           f"pass a name: lora_lab.load_adapter(model, {str(path)!r}, "
                           f"name={_suggest(folder)!r})") from None
    return folder


def _suggest(folder: str) -> str:
    name = folder.replace(".", "_").strip("_") or "adapter"
    try:
        check_adapter_name(name)
    except AdapterError:
        name = f"{name}_adapter"
    return name


def load_adapter(model: nn.Module, path, name: str | None = None, *, trainable: bool = False,
                 activate: bool = True) -> nn.Module:
    """Load the adapter saved in ``path`` onto ``model`` and return the peft model.

    The adapter is named ``name`` when given, else after its folder (``runs/answer`` → ``"answer"``),
    whether ``model`` is a plain model (the first adapter: the model gets wrapped by peft) or a peft
    model already; :func:`adapter_name_for` gives the name before loading."""
    import peft

    path = Path(path)
    _check_folder(path)
    name = adapter_name_for(path, name)
    spec = read_adapter_spec(path)
    if spec.is_lora:
        _check_shapes(model, path)
    wrapped = is_peft(model)
    if wrapped and name in model.peft_config:
        raise AdapterError(f"The model already has an adapter named {name!r}.",
                           "pass name='another_name' or delete the old one first")
    try:
        if wrapped:
            if not _fast_load(model, path, name, trainable):
                model.load_adapter(str(path), adapter_name=name, is_trainable=trainable)
            if activate:
                set_adapter(model, name)        # the fast switch; also undoes a set_adapter(None)
        else:
            with warnings.catch_warnings():  # peft 0.21 reads transformers' deprecated property
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
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


# -- fast path: add a plain LoRA adapter to layers that are already LoRA layers ----------------
#
# peft's ``PeftModel.load_adapter`` walks the whole module tree several times per load (matching
# targets, casting dtypes, a full ``state_dict()``, re-flagging trainability), and every loaded
# adapter adds modules to walk, so the k-th load slows down linearly in k.  When the new adapter
# is plain LoRA (ΔW = s·B·A with s = α/r, or α/√r for rsLoRA) and lands only on modules that are
# already LoRA layers, the same result is reached by calling each layer's ``update_layer`` (what
# peft itself calls there) and copying A (r×in) and B (out×r) straight from the safetensors file.


def _fast_load(model, path: Path, name: str, trainable: bool) -> bool:
    """Add the adapter in ``path`` to peft model ``model`` touching only the layers it targets;
    return False (having changed nothing) when it is not a plain LoRA adapter on existing LoRA
    layers, so that the caller takes peft's path."""
    plan = _fast_plan(model, path)
    if plan is None:
        _LOAD_PATHS["peft"] += 1
        return False
    config, layers, tensors = plan
    config.inference_mode = not trainable
    try:
        for key, layer in layers.items():
            _add_to_layer(layer, key, name, config, tensors[key], trainable)
        model.peft_config[name] = config
        model.base_model.targeted_module_names.extend(layers)
    except Exception:
        for layer in layers.values():             # undo: also a layer that failed half-way
            if name in layer.r or name in layer.lora_A:
                layer.delete_adapter(name)
        model.peft_config.pop(name, None)
        raise
    _LOAD_PATHS["fast"] += 1
    return True


def _fast_plan(model, path: Path):
    """``(config, {module: LoraLayer}, {module: (A, B)})`` when the fast path applies, else None."""
    import peft
    from peft.tuners.lora import LoraConfig, LoraLayer, LoraModel
    from peft.tuners.tuners_utils import check_target_module_exists

    if not isinstance(model.base_model, LoraModel) or model.peft_type != peft.PeftType.LORA:
        return None
    if any(getattr(c, f, None) for c in model.peft_config.values()      # auxiliary wrappers present
           for f in ("modules_to_save", "trainable_token_indices")):
        return None
    try:
        if json.loads((path / "adapter_config.json").read_text()).get("peft_type") != "LORA":
            return None
        config = LoraConfig.from_pretrained(str(path))
    except (TypeError, ValueError, KeyError):
        return None
    if (config.bias != "none" or config.target_modules is None
            or any(getattr(config, f, None) for f in _NOT_PLAIN)
            or config.init_lora_weights not in (True, False, "gaussian")):
        return None
    tensors = _read_lora_tensors(path)
    if tensors is None:
        return None
    wanted = {key for key, _ in _walk(model.base_model.model)
              if check_target_module_exists(config, key)}
    if wanted != set(tensors):
        return None
    layers = {}
    for key in tensors:
        layer = model.base_model.model.get_submodule(key)
        if (not isinstance(layer, LoraLayer)
                or type(layer).update_layer is not LoraLayer.update_layer
                or not layer.lora_A or layer.resolve_lora_variant(config=config) is not None
                or getattr(layer, "fan_in_fan_out", False) != config.fan_in_fan_out):
            return None
        a, b = tensors[key]
        if (tuple(a.shape) != (config.r, layer.in_features)
                or tuple(b.shape) != (layer.out_features, config.r)):
            return None
        layers[key] = layer
    return config, layers, tensors


def _read_lora_tensors(path: Path):
    """``{module: (A, B)}`` from ``adapter_model.safetensors``; None if it holds anything else."""
    from safetensors import safe_open

    out: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not iterable
            module, sep, rest = strip_prefix(key).rpartition(".lora_")
            if not key.startswith(PREFIX) or not sep or rest not in ("A.weight", "B.weight"):
                return None
            out.setdefault(module, {})[rest[0]] = f.get_tensor(key)
    if not out or any(set(ab) != {"A", "B"} for ab in out.values()):
        return None
    return {m: (ab["A"], ab["B"]) for m, ab in out.items()}


def _walk(module: nn.Module, prefix: str = ""):
    """Yield ``(name, module)`` like ``named_modules`` but without entering peft tuner layers, so
    the cost does not grow with the number of adapters loaded."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for child_name, child in module._modules.items():
        if child is None:
            continue
        key = f"{prefix}{child_name}"
        yield key, child
        if not isinstance(child, BaseTunerLayer):
            yield from _walk(child, key + ".")


def _add_to_layer(layer, key: str, name: str, config, ab, trainable: bool) -> None:
    """``update_layer`` on one LoRA layer, then A, B copied in; others' ``requires_grad`` kept."""
    old = [(p, p.requires_grad) for p in _adapter_params(layer)]
    layer.update_layer(name, config.r, lora_alpha=config.lora_alpha, config=_no_init(config),
                       target_name=key)
    for p, flag in old:
        p.requires_grad_(flag)
    a_mod, b_mod = layer.lora_A[name], layer.lora_B[name]
    up = _upcast_dtypes()
    if a_mod.weight.dtype in up:           # as peft's autocast_adapter_dtype: fp16/bf16 -> fp32
        a_mod.to(torch.float32)
        b_mod.to(torch.float32)
    with torch.no_grad():
        a_mod.weight.copy_(ab[0])
        b_mod.weight.copy_(ab[1])
    a_mod.weight.requires_grad_(trainable)
    b_mod.weight.requires_grad_(trainable)


def _adapter_params(layer) -> list:
    """The adapters' parameters in ``layer``: all that its ``set_adapter`` may re-flag."""
    out = []
    for attr in layer.adapter_layer_names:
        for sub in getattr(layer, attr).values():
            out.extend([sub] if isinstance(sub, nn.Parameter) else sub.parameters())
    return out


def _no_init(config):
    """A shallow copy of ``config`` that skips the random init (the weights are overwritten)."""
    import copy

    cfg = copy.copy(config)
    cfg.init_lora_weights = False
    return cfg


def _upcast_dtypes() -> set:
    from peft.utils import UPCAST_DTYPES

    return ({torch.float16, torch.bfloat16}
            | {getattr(torch, n) for n in UPCAST_DTYPES if hasattr(torch, n)})
