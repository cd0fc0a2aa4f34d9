'''The text of the scripts that :func:`lora_lab.export.script.export_script` writes.

Each script is ``HEAD + settings (generated) + COMMON + templates_data.DATA + launch.RUN`` followed
by ``LOSS + launch.TRAINER_MAIN`` (``train.py``, whose Trainer gets the ``ChunkedLoss`` mixin) or
``launch.TRL_MAIN`` (``train_trl.py``, TRL's own loss); the accelerate
configs (``ACCELERATE``) and ``README`` are here too.  The code here is never run by lora_lab
itself; it is text, run by the user with ``python`` or ``accelerate launch`` where lora_lab need not
be installed, so it imports only torch, transformers, peft, bitsandbytes (through transformers),
datasets and, for TRL, trl.  Its data functions (:mod:`lora_lab.export.templates_data`) are
line-for-line the rules of :mod:`lora_lab.hf.data.prepare` (tests check that they give the same
rows as :func:`lora_lab.prepare_dataset`).
'''

HEAD = '''\
#!/usr/bin/env python
"""@TITLE@, exported by lora_lab @VERSION@.

Standalone: it imports torch, transformers, peft, datasets@EXTRA@ (and bitsandbytes through
transformers for a quantized base), never lora_lab.  Change the settings below freely.

    python @NAME@                                                        # one GPU, or the CPU
    accelerate launch --config_file accelerate/single_gpu.yaml @NAME@
    accelerate launch --config_file accelerate/ddp.yaml --num_processes 4 @NAME@
    accelerate launch --config_file accelerate/fsdp_qlora.yaml --num_processes 2 @NAME@
    accelerate launch --config_file accelerate/cpu_ddp.yaml @NAME@ --cpu   # 2 CPU processes, gloo

It logs what lora_lab's dashboard shows (loss, eval loss, learning rate, grad norm, tokens/s,
memory) to the console and to OUTPUT_DIR/metrics.jsonl, and saves the adapter to
OUTPUT_DIR/adapter in peft's format (adapter_config.json + adapter_model.safetensors) plus
lora_lab_spec.json, so that lora_lab.load_adapter reads it back with the same AdapterSpec.
"""

import argparse
import csv
import json
import os
import random
import resource
import sys
import time
from pathlib import Path

import datasets
import peft
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback, set_seed
@MAIN_IMPORT@

HERE = Path(__file__).resolve().parent
'''

COMMON = '''
IGNORE_INDEX = -100  # labels of -100 add no loss (prompt tokens and padding)


def say(text: str) -> None:
    """Print a line in one write, so that lines of several processes never interleave."""
    sys.stdout.write(text + "\\n")
    sys.stdout.flush()


# ----------------------------------------------------------------------------- device and dtype
def is_fsdp() -> bool:
    """True under `accelerate launch` with an FSDP config (accelerate sets this variable)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def pick_device(force_cpu: bool) -> str:
    if force_cpu or not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"


def cpu_prefers_bf16() -> bool:
    """lora_lab's rule for a CPU: bf16 where the chip multiplies bf16 natively (x86 AVX512-BF16 or
    AMX, Arm's BF16 extension) and the model is at least 512 wide.  Elsewhere bf16 is slower than
    fp32 on a CPU (emulated, or matrices too small to win back the conversions: measured on 2 cores
    with AVX512-BF16, SmolLM2-135M (hidden 576) trains at 1.8x fp32's tokens/s, a hidden size of
    128 at 0.96x)."""
    import platform

    from transformers import AutoConfig

    arch = platform.machine().lower()
    if arch in ("x86_64", "amd64"):
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    elif arch in ("aarch64", "arm64"):
        try:
            with open("/proc/cpuinfo") as fh:
                native = any(line.startswith("Features") and " bf16" in line for line in fh)
        except OSError:
            native = False
    else:
        native = False
    hidden = getattr(AutoConfig.from_pretrained(MODEL), "hidden_size", None) if native else None
    return bool(native) and (hidden is None or hidden >= 512)


def compute_dtype(device: str) -> torch.dtype:
    """lora_lab's rule: on a CPU bf16 where cpu_prefers_bf16() (else fp32), bf16 on GPUs that have
    it, fp16 on GPUs without (a T4).  The adapter trains in fp32 whatever this is."""
    if QUANT and QUANT["compute_dtype"]:
        return getattr(torch, QUANT["compute_dtype"])
    if device == "cpu":
        return torch.bfloat16 if cpu_prefers_bf16() else torch.float32
    # native bf16 from compute capability 8.0 (Ampere); torch's is_bf16_supported() also says True
    # on a T4 (7.5), where bf16 is only emulated
    return torch.bfloat16 if torch.cuda.get_device_capability()[0] >= 8 else torch.float16


def mixed_precision(device: str) -> tuple[bool, bool]:
    """(bf16, fp16) for TrainingArguments from TRAIN["precision"] ("auto" follows compute_dtype)."""
    choice = TRAIN["precision"]
    if choice == "auto":
        dtype = compute_dtype(device)
        choice = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    return choice == "bf16", choice == "fp16"


# ----------------------------------------------------------------------------- the model
def load_model(device: str):
    """The base model (quantized by bitsandbytes when QUANT is set) and its tokenizer."""
    dtype = compute_dtype(device)
    kwargs = {"dtype": dtype}
    if QUANT and QUANT["bits"] == 8:
        if is_fsdp():
            raise SystemExit("FSDP cannot shard an 8-bit (LLM.int8) base: use 4-bit (QLoRA) or DDP.")
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    elif QUANT:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=QUANT["quant_type"],
            bnb_4bit_use_double_quant=QUANT["double_quant"],
            bnb_4bit_compute_dtype=dtype,
            # FSDP shards only floating-point tensors of one dtype: store the packed 4-bit weights
            # in the compute dtype (the bitsandbytes FSDP-QLoRA guide); uint8 otherwise.
            bnb_4bit_quant_storage=dtype if is_fsdp() else torch.uint8,
        )
    if not is_fsdp():  # FSDP places (and shards) the weights itself
        kwargs["device_map"] = {"": device}
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(MODEL, **kwargs)
    # No KV cache: a training forward has nothing to cache, and with a cache the model ignores the
    # packing (see pack()) and lets packed examples attend to each other.  (The Trainer sets this
    # too, from TrainingArguments.use_cache = False.)
    model.config.use_cache = False
    keep_4bit_layout(model)
    if QUANT and not is_fsdp():
        # fp32 norms and input gradients for k-bit training.  Not under FSDP: the upcast norms
        # would break FSDP's one-dtype-per-shard rule.
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=TRAIN["gradient_checkpointing"])
    return model, tokenizer


def keep_4bit_layout(model) -> None:
    """bitsandbytes (0.4x-0.50) on CPUs with AVX512-BF16 repacks a 4-bit weight the first time it
    runs in eval mode.  That layout is lossy (bf16 block scales) and drops the gradient to the
    layer's input, so LoRA factors below it stop learning after any evaluation.  Switch it off:
    eval forwards then use the same exact path as training (CPU only; no-op elsewhere)."""
    for module in model.modules():
        if type(module).__name__ == "Linear4bit" and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
'''

_LAUNCH = '''\
machine_rank: 0
main_training_function: main
mixed_precision: 'no'  # the script picks bf16 / fp16 / fp32 itself (TRAIN["precision"])
num_machines: 1
rdzv_backend: static
same_network: true
'''

ACCELERATE = {
    "single_gpu.yaml": '''\
# One process on one GPU (or on the CPU when there is no GPU).
#   accelerate launch --config_file accelerate/single_gpu.yaml train.py
compute_environment: LOCAL_MACHINE
distributed_type: 'NO'
gpu_ids: '0'
num_processes: 1
use_cpu: false
''' + _LAUNCH,
    "ddp.yaml": '''\
# DDP: one process per GPU, each with a full copy of the (quantized) base and the adapter;
# gradients are averaged after each step.  The batch size in train.py is per GPU.
#   accelerate launch --config_file accelerate/ddp.yaml --num_processes 4 train.py
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
gpu_ids: all
num_processes: 2
use_cpu: false
''' + _LAUNCH,
    "fsdp_qlora.yaml": '''\
# FSDP (+ QLoRA): shard the base weights, gradients and optimizer states over the GPUs, for a
# model that does not fit on one.  What FSDP + 4-bit needs (bitsandbytes' FSDP-QLoRA guide, peft's
# "Use PEFT QLoRA and FSDP" guide), and what train.py does under this config:
#   - bnb_4bit_quant_storage = the compute dtype (bf16), and the model loaded in that dtype, so that
#     every tensor FSDP flattens has one floating-point dtype (train.py sets both);
#   - fsdp_use_orig_params: false, with peft's fsdp_auto_wrap_policy, which puts the trainable
#     LoRA weights and the frozen ones in separate units (train.py sets it on the plugin);
#   - fsdp_cpu_ram_efficient_loading + fsdp_sync_module_states: only rank 0 reads the checkpoint;
#   - no prepare_model_for_kbit_training (its fp32 norms would mix dtypes in a unit).
# Set fsdp_offload_params: true to keep the shards in CPU RAM (slower, even less GPU memory).
#   accelerate launch --config_file accelerate/fsdp_qlora.yaml --num_processes 2 train.py
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
fsdp_config:
  fsdp_version: 1
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_backward_prefetch: BACKWARD_PRE
  fsdp_cpu_ram_efficient_loading: true
  fsdp_forward_prefetch: false
  fsdp_offload_params: false
  fsdp_sharding_strategy: FULL_SHARD
  fsdp_state_dict_type: SHARDED_STATE_DICT
  fsdp_sync_module_states: true
  fsdp_use_orig_params: false
num_processes: 2
use_cpu: false
''' + _LAUNCH,
    "cpu_ddp.yaml": '''\
# DDP on the CPU over gloo: check a multi-process run on a laptop or a CI machine.
#   accelerate launch --config_file accelerate/cpu_ddp.yaml train.py --cpu
# accelerate's own `--cpu --num_processes N` starts N CPU processes only through mpirun (Intel
# MPI / oneCCL); without mpirun it starts ONE.  This config uses the torchrun launcher instead,
# and train.py's --cpu flag makes each process train on the CPU (gloo backend).
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
gpu_ids: all
num_processes: 2
use_cpu: true
''' + _LAUNCH,
}

README = '''\
# @TITLE@

Exported by lora_lab @VERSION@ with `lora_lab.export_script`.  The scripts need torch,
transformers, peft, datasets and accelerate (bitsandbytes for a quantized base, trl for
`train_trl.py`), not lora_lab.

- base model: @MODEL@
- data: @DATA@
- adapter: `@SPEC@`
- quantization: @QUANT@

## Run (from this folder)

```bash
@COMMANDS@
```

Each run prints lora_lab's memory estimate first (computed at export time; see `MEMORY_ESTIMATE`
in `train.py`), logs loss, eval loss, learning rate, grad norm, tokens/s and memory per step
(also to `outputs/metrics.jsonl`), prints the peak memory it measured at the end, and saves the
adapter to `outputs/adapter` (peft format plus `lora_lab_spec.json`).  Every
`TRAIN["autosave_minutes"]` (10 by default; None turns it off) it also writes the Trainer's own
checkpoint, `outputs/checkpoint-N`, so a preempted or killed run keeps its work: run the same command
with `--resume` (and `--steps` for the total) to continue from the newest one.  Load the adapter with

```python
import lora_lab as ll
model, tok = ll.load_model("@MODEL_ID@"@QUANT_ARG@)
model = ll.load_adapter(model, "@PATH@/outputs/adapter")
```

## Notes

- Prompts are rendered and tokenized exactly as lora_lab does (`format_prompt`: the chat
  template with the generation prompt, else `DataSpec.template`; BOS once; labels -100 over the
  prompt), so the adapter answers the same prompts the same way.  The response ends as the chat
  template ends the turn (ChatML: `answer<|im_end|>\n`), or with eos when there is no template.
- Packing (`FORMAT["packing"]`) puts several examples in one row with `position_ids` that restart
  at 0 for each and no `attention_mask`, so each example attends only to itself; the model runs
  without a KV cache (`use_cache = False`).  The eval rows are never packed.
- `TRAIN["seed"]` is set before the adapter is created, so two runs start from the same adapter
  (on a CPU they train bit-identical ones; GPU kernels may round differently from run to run).
- `TRAIN["compile"]` runs each decoder layer through `torch.compile`, as `lora_lab.train` does (the
  first step compiles; a C++ compiler is needed on a CPU, Triton on a GPU).  The run ends with the
  number of graphs dynamo captured; 0 would mean the layers ran eagerly.  Not applied under FSDP.
- `train_trl.py` (if present) trains the same adapter with TRL's `SFTTrainer` on prompt-completion
  rows (`completion_only_loss`).  TRL tokenizes prompt and completion as one text and packs with
  its own strategy, so with a BPE tokenizer or packing its token ids can differ slightly from
  `train.py`'s.
- Several processes: the batch size is per process, so the global batch is
  `batch_size x grad_accum x processes`.  Under FSDP the checkpoint is gathered on rank 0 before
  saving.
- `accelerate launch --cpu --num_processes 2` starts only one process unless MPI is installed;
  use `accelerate/cpu_ddp.yaml` with `--cpu` as above.
'''
