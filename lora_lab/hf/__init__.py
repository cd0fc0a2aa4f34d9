"""The only layer that touches transformers, peft, bitsandbytes, datasets and safetensors."""

import logging as _logging

# bitsandbytes logs a harmless failure to fetch optional CPU kernels from the hub (PITFALLS.md).
_logging.getLogger("bitsandbytes").setLevel(_logging.ERROR)
