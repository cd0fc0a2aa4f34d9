"""Pure math on tensors and numbers: spectra, quantization error, memory model.  No transformers."""
