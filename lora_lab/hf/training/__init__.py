"""The bridge to ``transformers.Trainer`` (a callback that feeds lora_lab's dashboard) and the
bitsandbytes optimizers."""
