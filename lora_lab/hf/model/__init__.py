"""The base model: load it (hub id, folder, builtin; full precision or bitsandbytes int8/NF4/FP4),
choose its device and dtype, read what it has (linear layers, parameter counts, quantization) and
plan an adapter's memory before anything is loaded; write a model folder and read it back."""
