'''The second half of the exported scripts: metrics, saving and the run (``RUN``), then the
``transformers.Trainer`` main (``TRAINER_MAIN``) or TRL's (``TRL_MAIN``).  The first half, the
accelerate configs and the README are in :mod:`lora_lab.export.templates` and
:mod:`lora_lab.export.templates_data`.  Text only: lora_lab never runs it.
'''

RUN = '''
# ----------------------------------------------------------------------------- metrics
def memory_mb(device: str) -> tuple[float, str]:
    if device.startswith("cuda"):
        return torch.cuda.memory_allocated() / 2**20, "CUDA allocated"
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, "RSS"


def peak_memory_mb(device: str) -> tuple[float, str]:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20, "peak CUDA allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak RSS (incl. imports)"


class MetricsLogger(TrainerCallback):
    """One line per log (main process), and OUTPUT_DIR/metrics.jsonl: step, loss, eval loss,
    learning rate, grad norm, tokens/s (non-padding tokens, all processes) and memory."""

    def __init__(self, device: str, path: Path):
        self.device, self.path = device, path

    def on_train_begin(self, args, state, control, **kwargs):
        self.t_last, self.tokens_last = time.perf_counter(), state.num_input_tokens_seen or 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        mem, what = memory_mb(self.device)
        rec = {"step": state.global_step, "max_steps": state.max_steps, "memory_mb": mem}
        if "loss" in logs:
            now, tokens = time.perf_counter(), state.num_input_tokens_seen or 0
            rec.update(loss=logs["loss"], lr=logs.get("learning_rate"), grad_norm=logs.get("grad_norm"),
                       tokens_per_s=(tokens - self.tokens_last) / max(now - self.t_last, 1e-9))
            self.t_last, self.tokens_last = now, tokens
        if "eval_loss" in logs:
            rec["eval_loss"] = logs["eval_loss"]
        if "loss" not in rec and "eval_loss" not in rec:
            return  # the Trainer's end-of-training summary
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\\n")
        text = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in rec.items()
                if k not in ("step", "max_steps", "memory_mb") and v is not None}
        say(f"step {rec['step']}/{rec['max_steps']}  "
              + "  ".join(f"{k} {v}" for k, v in text.items())
              + f"  memory {mem:,.0f} MB ({what})")


class Autosave(TrainerCallback):
    """The Trainer's own checkpoint (OUTPUT_DIR/checkpoint-N: adapter, optimizer, scheduler, RNG) once
    TRAIN["autosave_minutes"] of wall time have passed since the last one, whatever the save
    strategy: a preempted or killed run keeps it, and `--resume` continues from the newest."""

    def __init__(self, minutes: float):
        self.every_s, self.last = minutes * 60, time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if time.perf_counter() - self.last >= self.every_s:
            control.should_save = True

    def on_save(self, args, state, control, **kwargs):
        self.last = time.perf_counter()


def callbacks(device: str, output_dir: Path) -> list:
    """MetricsLogger, and Autosave unless TRAIN["autosave_minutes"] is None."""
    minutes = TRAIN.get("autosave_minutes")
    return [MetricsLogger(device, output_dir / "metrics.jsonl"), *([Autosave(minutes)] if minutes else [])]


def compile_layers(model, device: str) -> int:
    """TRAIN["compile"], as lora_lab.train does it: each decoder layer (the classes the model lists
    in _no_split_modules) through torch.compile (TorchInductor), which fuses the norms, casts and
    activations between the matrix products; names, parameters and state dict stay as they are.  The
    layers share one graph, compiled in the first step.  Returns the number of layers compiled."""
    import importlib.util
    import shutil

    import torch._dynamo

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if not layers:
        raise SystemExit(f"TRAIN['compile'] compiles the decoder layers, and {type(base).__name__} lists "
                         "none (its _no_split_modules is empty): set TRAIN['compile'] = False.")
    gpu = device.startswith("cuda")  # inductor builds C++ on a CPU; Triton builds C launchers on a GPU
    chosen = os.environ.get("CC" if gpu else "CXX")
    compilers = (chosen,) if chosen else ("gcc", "clang") if gpu else ("g++", "clang++", "c++")
    missing = []
    if gpu and importlib.util.find_spec("triton") is None:
        missing.append("Triton (pip install triton)")
    if not any(shutil.which(c) for c in compilers):
        missing.append(f"a {'C' if gpu else 'C++'} compiler ({', '.join(compilers)} not on PATH)")
    if missing:
        raise SystemExit(f"TRAIN['compile'] needs {' and '.join(missing)} for torch.compile on "
                         f"{'a GPU' if gpu else 'the CPU'}: install it, or set TRAIN['compile'] = False "
                         "(the same training, eager).")
    # Under activation checkpointing the layer is traced with its recompute; transformers' hub-kernel
    # hooks write state around attention, and without this dynamo gives up and runs the layer eagerly
    if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    for layer in layers:
        layer.compile()
    return len(layers)


def graphs_captured() -> int:
    """How many graphs dynamo has captured in this process (0: everything ran eagerly)."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def checksum(model) -> float:
    """Sum of the trainable weights: the same on every process after DDP (it averages gradients)."""
    return float(sum(p.detach().double().sum() for p in model.parameters() if p.requires_grad))


def save_adapter(trainer, path: Path) -> None:
    """peft's adapter files plus lora_lab_spec.json, written to a temporary folder then renamed."""
    tmp = path.with_name(path.name + ".tmp")
    if trainer.is_fsdp_enabled:  # gather the sharded adapter weights on the main process
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        trainer.save_model(str(tmp))
        (tmp / "training_args.bin").unlink(missing_ok=True)
    elif trainer.is_world_process_zero():
        trainer.model.save_pretrained(str(tmp), safe_serialization=True)
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        (tmp / "lora_lab_spec.json").write_text(json.dumps(ADAPTER_SPEC, indent=2))
        if path.exists():
            old = path.with_name(path.name + ".old")
            os.replace(path, old)
            os.replace(tmp, path)
            import shutil
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    ap.add_argument("--steps", type=int, default=None, help="override TRAIN['steps']")
    ap.add_argument("--output-dir", default=None, help="override OUTPUT_DIR")
    ap.add_argument("--resume", action="store_true",
                    help="continue from the newest OUTPUT_DIR/checkpoint-N (--steps is the total)")
    return ap.parse_args()


def training_kwargs(device: str, output_dir: Path, has_eval: bool) -> dict:
    """TrainingArguments (or SFTConfig) fields from TRAIN."""
    bf16, fp16 = mixed_precision(device)
    every = TRAIN["eval_every"] if has_eval else None
    return dict(
        output_dir=str(output_dir), max_steps=TRAIN["steps"] or -1,
        num_train_epochs=TRAIN["epochs"] or 1.0,
        per_device_train_batch_size=TRAIN["batch_size"], per_device_eval_batch_size=TRAIN["batch_size"],
        gradient_accumulation_steps=TRAIN["grad_accum"], learning_rate=TRAIN["lr"],
        lr_scheduler_type=SCHEDULES[TRAIN["schedule"]], warmup_steps=TRAIN["warmup_steps"],
        weight_decay=TRAIN["weight_decay"], max_grad_norm=TRAIN["max_grad_norm"] or 0.0,
        optim=OPTIMIZERS[TRAIN["optimizer"]], seed=TRAIN["seed"], logging_steps=TRAIN["log_every"],
        eval_strategy="steps" if every else "no", eval_steps=every,
        save_strategy="steps" if TRAIN["save_every"] else "no", save_steps=TRAIN["save_every"],
        **checkpointing(TRAIN["gradient_checkpointing"]),
        bf16=bf16, fp16=fp16, use_cpu=device == "cpu", report_to="none",
        include_num_input_tokens_seen="non_padding", ddp_find_unused_parameters=False,
        disable_tqdm=True, remove_unused_columns=False)


def checkpointing(on: bool) -> dict:
    """Activation (gradient) checkpointing: recompute activations in the backward pass to save
    memory.  peft's FSDP-QLoRA recipe uses the reentrant kind, the non-reentrant one elsewhere.
    transformers 5.24 renamed the arguments; older versions have only the gradient_* names."""
    from transformers import TrainingArguments

    name = ("activation_checkpointing" if "activation_checkpointing"
            in TrainingArguments.__dataclass_fields__ else "gradient_checkpointing")
    return {name: on, f"{name}_kwargs": {"use_reentrant": bool(is_fsdp() and QUANT)}}


# lora_lab's names -> transformers' names
SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}
OPTIMIZERS = {"adamw": "adamw_torch_fused", "adamw_fused": "adamw_torch_fused",
              "adamw_8bit": "adamw_bnb_8bit", "paged_adamw_8bit": "paged_adamw_8bit",
              "paged_adamw": "paged_adamw_32bit", "sgd": "sgd"}


def start(args):
    """Settings from the command line, the device, the seed, and the memory estimate (main process)."""
    if args.steps:
        TRAIN["steps"] = args.steps
    accelerate_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true"
    if accelerate_cpu and "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ:
        say("note: `accelerate launch --cpu --num_processes N` started ONE process: accelerate "
              "starts several CPU processes only through mpirun.  For N CPU processes run\\n"
              "  accelerate launch --config_file accelerate/cpu_ddp.yaml --num_processes N "
              f"{Path(__file__).name} --cpu")
    device = pick_device(args.cpu or accelerate_cpu)
    # the adapter's random initial weights (LoRA's A) are drawn before the Trainer seeds: without
    # this, two runs of the same script start from different adapters (torch seeds each process anew)
    set_seed(TRAIN["seed"])
    output_dir = Path(args.output_dir) if args.output_dir else OUTPUT_DIR
    output_dir.mkdir(parents=True, exist_ok=True)
    if int(os.environ.get("RANK", 0)) == 0:
        say(MEMORY_ESTIMATE)
        (output_dir / "metrics.jsonl").unlink(missing_ok=True)
    return device, output_dir


def finish(trainer, device, output_dir, local_tokens, has_eval):
    """Final evaluation, the adapter, and what each process did."""
    if has_eval and not (TRAIN["eval_every"] and trainer.state.global_step % TRAIN["eval_every"] == 0):
        trainer.evaluate()
    save_adapter(trainer, output_dir / "adapter")
    a = trainer.args
    peak, what = peak_memory_mb(device)
    say(f"rank {a.process_index} of {a.world_size}: {trainer.state.global_step} steps, "
          f"{local_tokens} tokens trained on here, adapter checksum {checksum(trainer.model):.9f}, "
          f"{what} {peak:,.0f} MB")
    if trainer.is_world_process_zero():
        say(f"adapter saved to {output_dir / 'adapter'}")


class TokenCounting:
    """Put before a Trainer class: counts the non-padding tokens this process trains on
    (count_tokens: packed batches have no attention_mask to sum)."""

    local_tokens = 0

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.local_tokens += count_tokens(inputs)
        return super().training_step(model, inputs, num_items_in_batch)


def train_and_save(trainer, device, output_dir, resume=False):
    """Log through MetricsLogger, wrap for FSDP, say what each process trains, compile the decoder
    layers (TRAIN["compile"]), train (from the newest checkpoint with ``resume``), save."""
    trainer.remove_callback(PrinterCallback)  # MetricsLogger prints instead
    if trainer.is_fsdp_enabled:
        # peft + FSDP with use_orig_params=False: wrap trainable and frozen weights apart
        from peft.utils.other import fsdp_auto_wrap_policy
        trainer.accelerator.state.fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(trainer.model)
    a = trainer.args
    say(f"rank {a.process_index} of {a.world_size}: training on {a.device} "
          f"({a.parallel_mode.name.lower()}), {len(trainer.train_dataset)} train sequences")
    if trainer.is_world_process_zero() and hasattr(trainer.model, "print_trainable_parameters"):
        trainer.model.print_trainable_parameters()
    layers = 0
    if TRAIN.get("compile") and trainer.is_fsdp_enabled:
        say("note: TRAIN['compile'] is not applied under FSDP (its flattened parameters need "
            "use_orig_params=True, and peft's FSDP recipe uses False): the layers run eagerly.")
    elif TRAIN.get("compile"):
        layers = compile_layers(trainer.model, device)
    trainer.train(resume_from_checkpoint=True if resume else None)
    if layers:
        graphs = graphs_captured()
        say(f"torch.compile: {layers} decoder layers, {graphs} graph(s) captured"
            + ("" if graphs else ": none, so the layers ran eagerly"))
    finish(trainer, device, output_dir, trainer.local_tokens, trainer.eval_dataset is not None)
'''

TRAINER_MAIN = '''

# ----------------------------------------------------------------------------- training

class PadCollator:
    """Right-pad rows from tokenize() into (B, T) tensors, T = the longest row rounded up to a
    multiple of TRAIN["pad_to_multiple_of"] (never past the model's positions): input_ids with the
    pad id, labels with -100 (no loss), and attention_mask with 0 -- or, for packed rows, the
    position_ids with 0 and no attention_mask (see pack()).  A padding token at position 0 is a
    sequence of its own: no real token attends to it."""

    def __init__(self, pad_id: int, multiple_of=None, max_length=None):
        self.pad_id, self.multiple_of, self.max_length = pad_id, multiple_of, max_length

    def __call__(self, rows):
        B = len(rows)
        T = longest = max(len(r["input_ids"]) for r in rows)
        if self.multiple_of:
            T = -(-longest // self.multiple_of) * self.multiple_of
            T = max(longest, min(T, self.max_length)) if self.max_length else T
        third = "position_ids" if "position_ids" in rows[0] else "attention_mask"
        batch = {"input_ids": torch.full((B, T), self.pad_id, dtype=torch.long),
                 third: torch.zeros((B, T), dtype=torch.long),
                 "labels": torch.full((B, T), IGNORE_INDEX, dtype=torch.long)}
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            for key, values in batch.items():
                values[i, :n] = torch.tensor(r[key])
        return batch


class CountingTrainer(TokenCounting, Trainer):
    """A Trainer that counts the non-padding tokens this process trains on."""


def build_trainer(device, output_dir):
    """The model with its adapter, the tokenized rows (train packed when FORMAT["packing"], eval
    never) and the Trainer.  Packed batches have no attention_mask: the Trainer's token count then
    skips the pad id (exact unless the pad token is also eos)."""
    model, tokenizer = load_model(device)
    model = peft.get_peft_model(model, peft_config())
    train_rows, eval_rows = load_rows()
    train_ds = tokenize(train_rows, tokenizer, packing=FORMAT["packing"])
    eval_ds = tokenize(eval_rows, tokenizer) if eval_rows else None
    return CountingTrainer(
        model=model, args=TrainingArguments(**training_kwargs(device, output_dir, eval_ds is not None)),
        train_dataset=train_ds, eval_dataset=eval_ds, data_collator=PadCollator(
            tokenizer.pad_token_id, TRAIN.get("pad_to_multiple_of"),
            getattr(model.config, "max_position_embeddings", None)),
        processing_class=tokenizer, callbacks=callbacks(device, output_dir))


def main():
    args = parse_args()
    device, output_dir = start(args)
    train_and_save(build_trainer(device, output_dir), device, output_dir, args.resume)


if __name__ == "__main__":
    main()
'''

TRL_MAIN = '''

# ----------------------------------------------------------------------------- training with TRL

def prompt_completion(rows, tokenizer):
    """TRL's prompt-completion format, with the prompt rendered exactly as train.py renders it.
    TRL tokenizes with the tokenizer's special tokens, so a BOS that the rendered chat template
    already holds is removed from the text for tokenizers that add one.  Rows whose prompt fills
    max_length are dropped, as in train.py.  (TRL tokenizes prompt+completion as one text; for
    BPE tokenizers the tokens at the boundary can differ from train.py's.  TRL ends the completion
    with eos, where train.py ends it as the chat template ends the turn: the same for templates
    that close the turn with eos, one token apart for ChatML's "<|im_end|>\\n".)"""
    prompts, responses = prompts_and_responses(rows)
    texts = [format_prompt(tokenizer, p) for p in prompts]
    if bos_prefix(tokenizer) and tokenizer.bos_token:
        texts = [t[len(tokenizer.bos_token):] if t.startswith(tokenizer.bos_token) else t for t in texts]
    keep = [len(tokenizer(t)["input_ids"]) < FORMAT["max_length"] for t in texts]
    if not any(keep):
        raise SystemExit(f"Every row was truncated away: no response token fits in max_length = "
                         f"{FORMAT['max_length']}.  Raise FORMAT['max_length'], or shorten the prompts.")
    return datasets.Dataset.from_dict({
        "prompt": [t for t, k in zip(texts, keep) if k],
        "completion": [r for r, k in zip(responses, keep) if k]})


class CountingSFTTrainer(TokenCounting, SFTTrainer):
    """An SFTTrainer that counts the non-padding tokens this process trains on."""


def build_trainer(device, output_dir):
    model, tokenizer = load_model(device)
    train_rows, eval_rows = load_rows()
    train_ds = prompt_completion(train_rows, tokenizer)
    eval_ds = prompt_completion(eval_rows, tokenizer) if eval_rows else None
    config = SFTConfig(**training_kwargs(device, output_dir, eval_ds is not None),
                       max_length=FORMAT["max_length"], packing=FORMAT["packing"], eval_packing=False,
                       completion_only_loss=FORMAT["train_on_responses_only"])
    return CountingSFTTrainer(model=model, args=config, train_dataset=train_ds, eval_dataset=eval_ds,
                              processing_class=tokenizer, peft_config=peft_config(),
                              callbacks=callbacks(device, output_dir))


def main():
    args = parse_args()
    device, output_dir = start(args)
    train_and_save(build_trainer(device, output_dir), device, output_dir, args.resume)


if __name__ == "__main__":
    main()
'''
