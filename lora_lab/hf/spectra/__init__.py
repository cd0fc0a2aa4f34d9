"""The singular spectra of a model's LoRA updates (analysis, comparison of two adapters) and
compression of an adapter to a lower rank.  The math is in :mod:`lora_lab.core.spectrum`."""
