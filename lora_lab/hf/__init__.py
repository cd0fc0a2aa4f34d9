"""The only layer that touches transformers, peft, bitsandbytes, datasets and safetensors."""
