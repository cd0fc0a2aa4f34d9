"""Quantization through bitsandbytes: the round trip W → Q(W) of one weight, a streaming scan of a
checkpoint, and the error a quantized layer makes on its outputs."""
