"""lora_lab: see, try and understand LoRA and QLoRA fine-tuning inside a notebook.

Five lines from nothing to a trainable adapter::

    import lora_lab as ll
    model, tok = ll.load_model("builtin:tiny", quant="nf4")     # QLoRA base, works offline
    model = ll.attach(model, ll.AdapterSpec(r=8, target_modules="all-linear"))
    print(ll.count_parameters(model))                          # trainable / total / MB on disk
    data = ll.prepare_dataset(ll.builtin_task("reverse", n=500), tok)

Layers (imports point down only): ``ui`` → ``viz`` → ``train`` → ``export`` → ``hf`` → ``core``;
beside them ``specs`` (validated choices) and ``errors`` (:class:`LoraLabError`).  The tree and where
each feature lives: ``docs/architecture.md``.  Public names are imported
lazily, so ``import lora_lab`` stays cheap until you use something.
"""

from __future__ import annotations

import importlib

from ._version import __version__  # noqa: F401  (re-exported as lora_lab.__version__)
from .errors import *  # noqa: F401,F403  (errors are tiny and always needed)
from .errors import LoraLabError
from .specs import AdapterSpec, DataSpec, QuantSpec, TrainSpec

# public name -> module that defines it (relative to lora_lab)
_LAZY = {
    "load_model": "hf.model.loading",
    "builtin_names": "hf.model.builtin",
    "builtin_card": "hf.model.builtin",
    "pretraining_skills": "hf.data.tasks",
    "inspect_model": "hf.model.inspect",
    "count_parameters": "hf.model.inspect",
    "ParameterCount": "hf.model.inspect",
    "attach": "hf.adapters.attach",
    "save_adapter": "hf.adapters.io",
    "load_adapter": "hf.adapters.io",
    "list_adapters": "hf.adapters.registry",
    "set_adapter": "hf.adapters.switch",
    "delete_adapter": "hf.adapters.registry",
    "disabled_adapters": "hf.adapters.switch",
    "merge_adapter": "hf.adapters.merge",
    "unmerge_adapter": "hf.adapters.merge",
    "merged_copy": "hf.adapters.merge",
    "MergeReport": "hf.adapters.merge",
    "active_adapter": "hf.adapters.switch",
    "read_adapter_spec": "hf.adapters.io",
    "to_peft_config": "hf.adapters.peft_config",
    "BlendReport": "hf.adapters.blend",
    "blend_adapters": "hf.adapters.blend",
    "lora_factors": "hf.adapters.factors",
    "LoraFactors": "hf.adapters.factors",
    "prepare_dataset": "hf.data.prepare",
    "PreparedData": "hf.data.prepare",
    "format_prompt": "hf.data.prepare",
    "encode_prompt": "hf.data.prepare",
    "pad_batch": "hf.data.prepare",
    "builtin_tasks": "hf.data.tasks",
    "builtin_task": "hf.data.tasks",
    "task_accuracy": "hf.generate.batch",
    "task_completions": "hf.generate.batch",
    "follows_format": "hf.data.chat_tasks",
    "train": "train.loop",
    "TrainResult": "train.result",
    "Control": "train.events",
    "TrainState": "train.events",
    "Callback": "train.events",
    "LiveCallback": "hf.training.trainer_callback",
    "adapter_spectra": "hf.spectra.analysis",
    "compare_adapters": "hf.spectra.analysis",
    "compress_adapter": "hf.spectra.compress",
    "AdapterSpectra": "hf.spectra.analysis",
    "AdapterComparison": "hf.spectra.analysis",
    "Compression": "hf.spectra.compress",
    "Spectrum": "core.spectrum",
    "lowrank_svdvals": "core.spectrum",
    "lowrank_svd": "core.spectrum",
    "randomized_svd": "core.randomized",
    "SpectrumProbe": "train.spectrum_probe",
    "rank_sweep": "train.rank_sweep",
    "RankSweep": "train.rank_sweep",
    "export_script": "export.script",
    "ExportedScript": "export.script",
    "export_merged": "export.merged",
    "MergedExport": "export.merged",
    "report": "viz.report",
    "loftq_initialize": "hf.adapters.loftq",
    "LoftQReport": "hf.adapters.loftq",
    "quant_error": "hf.quant.roundtrip",
    "lowrank_recovery": "hf.quant.roundtrip",
    "scan_quantization": "hf.quant.scan",
    "QuantScan": "hf.quant.scan",
    "QuantError": "core.quant",
    "RecoveryResult": "core.lowrank",
    "LowRankCorrection": "core.lowrank",
    "quantized_output_error": "hf.quant.output",
    "OutputError": "hf.quant.output",
    "estimate_memory": "hf.model.plan",
    "memory_limit_gb": "hf.model.device",
    "generate": "hf.generate.stream",
    "stream_generate": "hf.generate.stream",
    "switch_adapter": "hf.adapters.switch",
    "GenerationResult": "hf.generate.stream",
    "hotswap_adapter": "hf.adapters.hotswap",
    "mixed_throughput": "hf.generate.throughput",
    "check_serving": "hf.adapters.serving_check",
    "ServingCheck": "hf.adapters.serving_check",
    "serving_recipe": "export.serving_recipes",
    "ServingRecipe": "export.serving_recipes",
    "prepare_hotswap": "hf.adapters.hotswap",
    "HotswapReport": "hf.adapters.hotswap",
    "CompileCounter": "hf.adapters.hotswap",
    "MemoryEstimate": "hf.model.plan",
}

# `lora_lab.train` is both a subpackage and the public function.  Import the (import-free)
# subpackage now and drop its name, so that `lora_lab.train` resolves lazily to the function and
# stays so after any `lora_lab.train.*` module is imported.
importlib.import_module(".train", __name__)
globals().pop("train", None)

__all__ = ["LoraLabError", "AdapterSpec", "DataSpec", "QuantSpec", "TrainSpec", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lora_lab' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
