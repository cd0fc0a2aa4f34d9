"""The only layer that touches transformers, peft, bitsandbytes, datasets and safetensors."""

import logging as _logging

# Importing bitsandbytes offline (every 4-bit load, every quantization scan) logs two harmless
# warnings: the `kernels` package's "Skipping publisher trust check for 'kernels-community/...'"
# and bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" (an optional
# faster CPU kernel from the hub; the builtin one is used).  A user can act on neither; real errors
# (level ERROR and above) still show.
for _name in ("bitsandbytes", "kernels"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
