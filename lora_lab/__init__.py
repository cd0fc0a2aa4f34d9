"""lora_lab: see, try and understand LoRA and QLoRA fine-tuning inside a notebook.

Five lines from nothing to a trainable adapter::

    import lora_lab as ll
    model, tok = ll.load_model("builtin:tiny", quant="nf4")     # QLoRA base, works offline
    model = ll.attach(model, ll.AdapterSpec(r=8, target_modules="all-linear"))
    print(ll.count_parameters(model))                          # trainable / total / MB on disk
    data = ll.prepare_dataset(ll.builtin_task("reverse", n=500), tok)

Layers (imports point down only): ``ui`` → ``viz`` → ``train`` → ``hf`` → ``core``; beside them
``specs`` (validated choices) and ``errors`` (:class:`LoraLabError`).  Public names are imported
lazily, so ``import lora_lab`` stays cheap until you use something.
"""

from __future__ import annotations

import importlib

from .errors import *  # noqa: F401,F403  (errors are tiny and always needed)
from .errors import LoraLabError
from .specs import AdapterSpec, DataSpec, QuantSpec, TrainSpec

__version__ = "0.1.0"

# public name -> module that defines it (relative to lora_lab)
_LAZY = {
    "load_model": "hf.loading",
    "builtin_names": "hf.builtin",
    "builtin_card": "hf.builtin",
    "pretraining_skills": "hf.tasks",
    "inspect_model": "hf.inspect",
    "count_parameters": "hf.inspect",
    "ParameterCount": "hf.inspect",
    "attach": "hf.adapters",
    "save_adapter": "hf.adapters",
    "load_adapter": "hf.adapters",
    "list_adapters": "hf.adapters",
    "set_adapter": "hf.adapters",
    "delete_adapter": "hf.adapters",
    "disabled_adapters": "hf.adapters",
    "merge_adapter": "hf.adapters",
    "unmerge_adapter": "hf.adapters",
    "merged_copy": "hf.adapters",
    "MergeReport": "hf.adapters",
    "active_adapter": "hf.adapters",
    "read_adapter_spec": "hf.adapters",
    "BlendReport": "hf.blend",
    "blend_adapters": "hf.blend",
    "lora_factors": "hf.factors",
    "LoraFactors": "hf.factors",
    "prepare_dataset": "hf.data",
    "PreparedData": "hf.data",
    "format_prompt": "hf.data",
    "encode_prompt": "hf.data",
    "pad_batch": "hf.data",
    "builtin_tasks": "hf.tasks",
    "builtin_task": "hf.tasks",
    "task_accuracy": "hf.tasks",
    "train": "train.loop",
    "TrainResult": "train.loop",
    "Control": "train.events",
    "TrainState": "train.events",
    "Callback": "train.events",
    "LiveCallback": "hf.trainer_callback",
    "adapter_spectra": "hf.spectra",
    "compare_adapters": "hf.spectra",
    "compress_adapter": "hf.spectra",
    "AdapterSpectra": "hf.spectra",
    "AdapterComparison": "hf.spectra",
    "Compression": "hf.spectra",
    "Spectrum": "core.spectrum",
    "lowrank_svdvals": "core.spectrum",
    "lowrank_svd": "core.spectrum",
    "randomized_svd": "core.randomized",
    "SpectrumProbe": "train.spectrum_probe",
    "rank_sweep": "train.rank_sweep",
    "RankSweep": "train.rank_sweep",
    "export_script": "hf.export_script",
    "ExportedScript": "hf.export_script",
    "export_merged": "hf.export_merged",
    "MergedExport": "hf.export_merged",
    "report": "viz.report",
    "loftq_initialize": "hf.loftq",
    "LoftQReport": "hf.loftq",
    "quant_error": "hf.quant",
    "lowrank_recovery": "hf.quant",
    "scan_quantization": "hf.quant",
    "QuantScan": "hf.quant",
    "QuantError": "core.quant",
    "RecoveryResult": "core.quant",
    "LowRankCorrection": "core.quant",
    "quantized_output_error": "hf.quant_output",
    "OutputError": "hf.quant_output",
    "estimate_memory": "hf.plan",
    "generate": "hf.generate",
    "stream_generate": "hf.generate",
    "switch_adapter": "hf.generate",
    "GenerationResult": "hf.generate",
    "MemoryEstimate": "hf.plan",
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
