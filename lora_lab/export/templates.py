'''The text of the scripts that :func:`lora_lab.export.script.export_script` writes.

Each script is ``HEAD + settings (generated) + COMMON + export_launch.RUN`` followed by
``export_launch.TRAINER_MAIN`` (``train.py``) or ``export_launch.TRL_MAIN`` (``train_trl.py``); the
accelerate configs (``ACCELERATE``) and ``README`` are here too.  The code here is never run by lora_lab itself; it is text,
run by the user with ``python`` or ``accelerate launch`` where lora_lab need not be installed, so it
imports only torch, transformers, peft, bitsandbytes (through transformers), datasets and, for TRL,
trl.  Its data functions are line-for-line the rules of :mod:`lora_lab.hf.data.prepare` (a test
checks that they give the same token ids and labels as :func:`lora_lab.prepare_dataset`).
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
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
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


def compute_dtype(device: str) -> torch.dtype:
    """fp32 on CPU, bf16 on GPUs that have it, fp16 on GPUs without (a T4): lora_lab's rule."""
    if QUANT and QUANT["compute_dtype"]:
        return getattr(torch, QUANT["compute_dtype"])
    if device == "cpu":
        return torch.float32
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


# ----------------------------------------------------------------------------- the data
def read_jsonl(path):
    return datasets.load_dataset("json", data_files=str(path), split="train").to_list()


def read_source(source):
    """(train rows, eval rows or None) of a .json/.jsonl/.csv/.tsv file, a save_to_disk folder or
    a hub dataset (its 'train' split, and 'validation' or 'test' as eval)."""
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() in (".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as f:  # keeps "42" a string
            return list(csv.DictReader(f, delimiter="\\t" if path.suffix.lower() == ".tsv" else ",")), None
    if path.is_file():
        return read_jsonl(path), None
    ds = datasets.load_from_disk(str(path)) if path.is_dir() else datasets.load_dataset(source)
    if isinstance(ds, datasets.DatasetDict):
        train = "train" if "train" in ds else next(iter(ds))
        ev = next((s for s in ("validation", "test") if s in ds and s != train), None)
        return ds[train].to_list(), (ds[ev].to_list() if ev else None)
    return ds.to_list(), None


def split_eval(rows, fraction, seed):
    """Hold out round(n * fraction) rows (at least 1, never all), chosen by `seed`."""
    n = len(rows)
    if fraction <= 0 or n < 2:
        return rows, None
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:min(n - 1, max(1, round(n * fraction)))])
    return ([r for i, r in enumerate(rows) if i not in held],
            [r for i, r in enumerate(rows) if i in held])


def load_rows():
    """Train and eval rows: the files written at export time, or DATA["source"] split here."""
    if DATA["source"] is None:
        return (read_jsonl(HERE / DATA["train"]),
                read_jsonl(HERE / DATA["eval"]) if DATA["eval"] else None)
    train, ev = read_source(DATA["source"])
    if FORMAT["eval_fraction"] == 0:
        return train, None
    return (train, ev) if ev is not None else split_eval(train, FORMAT["eval_fraction"], FORMAT["seed"])


def prompts_and_responses(rows):
    """Per row: the prompt (a string, or the messages before the last assistant turn) and the
    response (a string, or that last assistant message's content)."""
    p, r, m = FORMAT["prompt_column"], FORMAT["response_column"], FORMAT["messages_column"]
    if p in rows[0] and r in rows[0]:
        return [row[p] for row in rows], [row[r] for row in rows]
    prompts, responses = [], []
    for i, row in enumerate(rows):
        msgs = [{"role": x["role"], "content": x["content"]} for x in row[m]]
        last = max((j for j, x in enumerate(msgs) if x["role"] == "assistant"), default=None)
        if not last:
            raise SystemExit(f"row {i} has no assistant message after a prompt")
        prompts.append(msgs[:last])
        responses.append(msgs[last]["content"])
    return prompts, responses


def format_prompt(tokenizer, prompt) -> str:
    """The text before the response: the chat template with the generation prompt when the
    tokenizer has one (and FORMAT["use_chat_template"]), else FORMAT["template"]."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if FORMAT["use_chat_template"] and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if not isinstance(prompt, str):
        prompt = (messages[0]["content"] if len(messages) == 1 and messages[0]["role"] == "user"
                  else "\\n".join(f"{x['role']}: {x['content']}" for x in messages))
    return FORMAT["template"].format(prompt=prompt)


def bos_prefix(tokenizer) -> list:
    """[bos_token_id] when the tokenizer adds a BOS by itself (Llama does), else []."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return [bos] if with_special[:1] == [bos] and plain[:1] != [bos] else []


def tokenize(rows, tokenizer):
    """input_ids = [BOS] prompt response EOS; labels = -100 over the prompt (when
    FORMAT["train_on_responses_only"]), then response EOS.  Prompt and response are tokenized
    apart, so the prompt ids are exactly those of generation.  The first max_length tokens are
    kept; a row whose prompt alone fills max_length is dropped."""
    prompts, responses = prompts_and_responses(rows)
    bos, L = bos_prefix(tokenizer), FORMAT["max_length"]
    texts = [format_prompt(tokenizer, p) for p in prompts]
    p_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
    examples = []
    for p, r in zip(p_ids, r_ids):
        p = list(p) if not bos or p[:1] == bos else bos + list(p)  # a template may hold <s>
        r = list(r) + [tokenizer.eos_token_id]
        if len(p) >= L:
            continue
        p_labels = [IGNORE_INDEX] * len(p) if FORMAT["train_on_responses_only"] else p
        examples.append({"input_ids": (p + r)[:L], "labels": (p_labels + r)[:L]})
    if not examples:
        raise SystemExit(f"Every row was truncated away: no response token fits in max_length = {L}. "
                         "Raise FORMAT['max_length'], or shorten the prompts.")
    if FORMAT["packing"]:  # whole examples, in order, into sequences of <= max_length tokens
        packs = []
        for ex in examples:
            if not packs or len(packs[-1]["input_ids"]) + len(ex["input_ids"]) > L:
                packs.append({"input_ids": [], "labels": []})
            packs[-1]["input_ids"] += ex["input_ids"]
            packs[-1]["labels"] += ex["labels"]
        examples = packs
    return datasets.Dataset.from_dict({
        "input_ids": [e["input_ids"] for e in examples],
        "attention_mask": [[1] * len(e["input_ids"]) for e in examples],
        "labels": [e["labels"] for e in examples]})
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
adapter to `outputs/adapter` (peft format plus `lora_lab_spec.json`):

```python
import lora_lab as ll
model, tok = ll.load_model("@MODEL_ID@"@QUANT_ARG@)
model = ll.load_adapter(model, "@PATH@/outputs/adapter")
```

## Notes

- Prompts are rendered and tokenized exactly as lora_lab does (`format_prompt`: the chat
  template with the generation prompt, else `DataSpec.template`; BOS once; labels -100 over the
  prompt), so the adapter answers the same prompts the same way.
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
