"""Export a notebook's choices as a standalone training script plus accelerate configs.

::

    out = lora_lab.export_script(AdapterSpec(r=8), "nf4", TrainSpec(steps=500), DataSpec(),
                                 model_id="HuggingFaceTB/SmolLM2-135M", path="export",
                                 data="my_rows.jsonl", trl=True)
    out          # the files written and the exact `accelerate launch` commands

The folder gets ``train.py`` (``transformers.Trainer``), optionally ``train_trl.py`` (TRL's
``SFTTrainer``), ``accelerate/{single_gpu,ddp,fsdp_qlora,cpu_ddp}.yaml``, ``README.md``, the data
(``data/train.jsonl`` and ``data/eval.jsonl`` when the rows live in memory) and, for a builtin
model, the model itself (``model/``, 4 MB, so that the export runs where lora_lab is not
installed).  The scripts import torch, transformers, peft, datasets (and trl), never lora_lab.
Every choice is written out literally in the script's settings block: the peft config is the one
:func:`~lora_lab.hf.adapters.peft_config.to_peft_config` builds, field by field; the data rules
are those of :func:`lora_lab.prepare_dataset`; the memory estimate is :func:`lora_lab.estimate_memory`'s,
computed here and embedded as text.  ``TrainSpec.chunked_loss`` is honoured by ``train.py``: its
Trainer's ``compute_loss`` runs the chunked loss of :mod:`lora_lab.hf.training.chunked_loss`, written
into the script (``templates_loss.LOSS``); ``train_trl.py`` keeps TRL's own loss.
"""

from __future__ import annotations

import html
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from .._version import __version__
from ..errors import LoraLabError, ModelLoadError, SpecError
from ..hf.adapters.peft_config import to_peft_config
from ..hf.model.builtin import is_builtin, resolve_builtin
from ..specs import AdapterSpec, DataSpec, QuantSpec, TrainSpec
from . import launch as L
from . import templates as T
from . import templates_data as TD
from .data_files import export_data as _data
from .templates_loss import LOSS

__all__ = ["export_script", "ExportedScript"]

TRAINER_IMPORT = "from transformers import PrinterCallback, Trainer, TrainingArguments"
TRL_IMPORT = "from transformers import PrinterCallback\nfrom trl import SFTConfig, SFTTrainer"


@dataclass(frozen=True)
class ExportedScript:
    """What :func:`export_script` wrote.

    ``path``: the folder; ``files``: the files written, relative to it; ``model`` and ``data``:
    where the scripts read the base model and the rows from; ``commands``: ``(what, command)``
    pairs to run it; ``estimate``: the memory estimate embedded in the scripts.
    """

    path: str
    files: tuple[str, ...]
    model: str
    data: str
    commands: tuple[tuple[str, str], ...]
    estimate: str

    def file(self, name: str) -> Path:
        """The full path of one written file, e.g. ``out.file("train.py")``."""
        return Path(self.path) / name

    def __repr__(self) -> str:
        width = max(len(w) for w, _ in self.commands)
        cmds = "\n".join(f"  {w:<{width}}  {c}" for w, c in self.commands)
        return (f"ExportedScript({self.path}: {', '.join(self.files)})\n"
                f"  model: {self.model}\n  data: {self.data}\nRun it with:\n{cmds}")

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><td>{html.escape(w)}</td><td><code>{html.escape(c)}</code></td></tr>"
                       for w, c in self.commands)
        return (f"<b>Exported to {html.escape(self.path)}</b>: {html.escape(', '.join(self.files))}"
                f"<br>model: {html.escape(self.model)}<br>data: {html.escape(self.data)}"
                f"<table>{rows}</table>")


# ----------------------------------------------------------------------------- checks
def _check_specs(adapter_spec, quant_spec, train_spec, data_spec):
    if not isinstance(adapter_spec, AdapterSpec):
        raise SpecError("export_script", "adapter_spec", adapter_spec, "must be an AdapterSpec",
                        "pass lora_lab.AdapterSpec(r=8)")
    quant = QuantSpec.parse(quant_spec)
    train = TrainSpec() if train_spec is None else train_spec
    data = DataSpec() if data_spec is None else data_spec
    for name, value, cls in (("train_spec", train, TrainSpec), ("data_spec", data, DataSpec)):
        if not isinstance(value, cls):
            raise SpecError("export_script", name, value, f"must be a {cls.__name__} or None",
                            f"pass lora_lab.{cls.__name__}(...)")
    if adapter_spec.init == "loftq":
        raise SpecError("AdapterSpec", "init", "loftq",
                        "the exported script cannot express LoftQ: peft's LoftQ runs on CUDA only and "
                        "needs the full-precision base, and lora_lab's CPU LoftQ is not part of peft",
                        "export with init='default' (or 'gaussian'); LoftQ-initialise in lora_lab "
                        "and train there")
    if data.packing and adapter_spec.method in ("prompt", "prefix"):
        raise SpecError("DataSpec", "packing", True,
                        f"a packed row keeps its examples apart through position_ids, which peft's "
                        f"{adapter_spec.method} tuning drops or shifts (its virtual tokens come first)",
                        "pass DataSpec(packing=False), or a LoRA or IA3 adapter")
    if train.chunked_loss is True and adapter_spec.method in ("prompt", "prefix"):
        raise SpecError("TrainSpec", "chunked_loss", True,
                        f"the chunked loss runs the decoder and the LM head itself, past peft's "
                        f"{adapter_spec.method} tuning forward that adds the virtual tokens",
                        "pass TrainSpec(chunked_loss=False) (or 'auto', which keeps the full loss "
                        "for prompt learning)")
    if quant is not None and adapter_spec.init in ("pissa", "olora"):
        raise SpecError("AdapterSpec", "init", adapter_spec.init,
                        f"{adapter_spec.init} rewrites the base weights, which a quantized base "
                        "cannot take", "pass quant_spec=None, or init='default'")
    return quant, train, data


def _check_folder(path) -> Path:
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise LoraLabError(f"export_script got path={path!r}, which is not a folder name.",
                           "pass a folder such as path='export'")
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise LoraLabError(f"The export path {str(folder)!r} is a file, not a folder.",
                           "pass a new or existing folder, e.g. path='export'")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LoraLabError(f"Cannot create the export folder {str(folder)!r}: {exc.strerror}.",
                           "pass a folder you can write to") from exc
    return folder


# ----------------------------------------------------------------------------- the pieces
def _model(model_id) -> tuple[str, str, str]:
    """(python expression for MODEL, description, the source lora_lab reads its config from).
    A builtin model is copied into the export (``model/``, 4 MB) by the caller: its folder lives
    inside the lora_lab package, which the machine that runs the script need not have."""
    from ..hf.model.loading import resolve_source

    if is_builtin(model_id):
        src = resolve_builtin(model_id)
        note = f"{model_id}, copied into model/ so that the export runs without lora_lab"
        return 'str(HERE / "model")', note, str(src)
    resolved = resolve_source(model_id)
    if Path(resolved).exists():
        path = str(Path(resolved).resolve())
        return repr(path), f"the local folder {path}", path
    return repr(resolved), f"the hub model {resolved}", resolved


def _literal(value) -> str:
    """A Python literal of a peft config field (sets as sorted lists)."""
    if isinstance(value, (set, frozenset)):
        value = sorted(value)
    return repr(value)


_ALWAYS = ("task_type", "r", "lora_alpha", "lora_dropout", "target_modules", "bias",
           "init_lora_weights", "use_dora", "use_rslora", "layers_to_transform",
           "num_virtual_tokens", "feedforward_modules")


def peft_config_code(spec: AdapterSpec) -> str:
    """The ``peft_config()`` function of the script: ``to_peft_config(spec)`` field by field
    (only fields that differ from the peft class's defaults, plus ``task_type``)."""
    cfg = to_peft_config(spec)
    cls = type(cfg)
    default = cls(task_type=cfg.task_type).to_dict()
    skip = {"peft_type", "auto_mapping", "base_model_name_or_path", "revision"}
    fields = {k: v for k, v in cfg.to_dict().items()
              if k not in skip and (k in _ALWAYS or v != default.get(k))}
    args = "".join(f"        {k}={_literal(v)},\n" for k, v in fields.items())
    return (f"def peft_config():\n"
            f'    """The adapter: what lora_lab\'s to_peft_config(spec) builds for\n'
            f"    {_wrap(repr(spec))}\n"
            f'    (fields left out have peft\'s defaults)."""\n'
            f"    return peft.{cls.__name__}(\n{args}    )\n")


def _wrap(text: str, width: int = 92) -> str:
    lines, line = [], ""
    for word in text.split(" "):
        if line and len(line) + len(word) + 1 > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return "\n    ".join(lines + [line])


def _estimate(source, spec, quant, train: TrainSpec, data: DataSpec, device) -> str:
    """lora_lab's memory estimate as text (or why there is none).  A spec that does not fit the
    model (unknown target modules, r too large) raises here, before anything is written."""
    from ..hf.model.plan import estimate_memory

    try:
        est = estimate_memory(source, adapter=spec, quant=quant, batch_size=train.batch_size,
                              seq_len=data.max_length,
                              gradient_checkpointing=train.gradient_checkpointing,
                              optimizer=train.optimizer, precision=train.precision,
                              grad_accum=train.grad_accum, device=device,
                              chunked_loss=train.chunked_loss, loss_chunk_size=train.loss_chunk_size)
    except ModelLoadError as exc:
        return f"(no memory estimate: lora_lab could not read the model's config: {exc.problem})"
    need = est.need() / 2**30
    return (f"Memory estimate by lora_lab at export time: {est.chosen} on {est.device} needs "
            f"{need:.2f} GiB ({est.verdict()}),\n"
            f"batch {est.batch_size} x {est.seq_len} tokens, "
            f"gradient checkpointing {'on' if est.gradient_checkpointing else 'off'}, "
            f"{'chunked loss' if est.loss_chunk else 'full-vocabulary loss'}.\n"
            f"GiB per term:\n{est.table().round(3).to_string()}")


def fmt(d: dict | None) -> str:
    """A dict as a Python literal, one key per line."""
    if d is None:
        return "None"
    return "{\n" + "".join(f"    {k!r}: {v!r},\n" for k, v in d.items()) + "}"


def _settings(model_expr, model_note, quant, spec, data_cfg, data, train, estimate) -> str:
    q = None if quant is None else asdict(quant)
    t = {k: v for k, v in asdict(train).items() if k != "output_dir"}
    out = ("HERE / 'outputs'" if not train.output_dir else
           f"HERE / {train.output_dir!r}" if not Path(train.output_dir).is_absolute()
           else f"Path({train.output_dir!r})")
    est = ('"""\\\n' + estimate + '\n"""') if '"""' not in estimate and "\\" not in estimate \
        else repr(estimate)
    return f'''
# ----------------------------------------------------------------------------- settings
# Written by lora_lab.export_script from the notebook's choices.  Edit them here.

# The base model: {model_note}.
MODEL = {model_expr}

# bitsandbytes quantization of the base (None: full precision).  compute_dtype None = automatic.
QUANT = {fmt(q)}

# The rows: DATA["train"]/["eval"] are files next to this script (split by lora_lab at export
# time); DATA["source"] is a file, folder or hub dataset, split here as lora_lab splits it.
DATA = {fmt(data_cfg)}

# lora_lab's DataSpec: how rows become prompt/response token ids (see tokenize()).
FORMAT = {fmt(asdict(data))}

# lora_lab's TrainSpec.
TRAIN = {fmt(t)}

OUTPUT_DIR = {out}

# lora_lab's AdapterSpec, saved beside the adapter as lora_lab_spec.json.
ADAPTER_SPEC = {fmt(json.loads(json.dumps(spec.to_dict())))}

{peft_config_code(spec)}

# Computed by lora_lab.estimate_memory when this script was exported (not recomputed here), so
# that the run can be compared with it; the script prints the peak memory it measures at the end.
MEMORY_ESTIMATE = {est}
'''


def _commands(folder: str, trl: bool) -> tuple[tuple[str, str], ...]:
    """(what, command) pairs; ``folder="."`` gives them as run from inside the export."""
    if folder == ".":
        return tuple((w, c.replace("./", "")) for w, c in _commands("./", trl))
    folder = folder.rstrip("/") if folder != "./" else "."
    acc = f"accelerate launch --config_file {folder}/accelerate"
    cmds = [("one GPU (or CPU)", f"python {folder}/train.py"),
            ("one GPU", f"{acc}/single_gpu.yaml {folder}/train.py"),
            ("several GPUs (DDP)", f"{acc}/ddp.yaml --num_processes 4 {folder}/train.py"),
            ("FSDP + QLoRA", f"{acc}/fsdp_qlora.yaml --num_processes 2 {folder}/train.py"),
            ("2 CPU processes (DDP, gloo)", f"{acc}/cpu_ddp.yaml {folder}/train.py --cpu")]
    if trl:
        cmds.append(("TRL SFTTrainer", f"{acc}/single_gpu.yaml {folder}/train_trl.py"))
    return tuple(cmds)


_TRAINER_CLASS = "class CountingTrainer(TokenCounting, Trainer):"


def _trainer_main() -> str:
    """``train.py``'s main: the chunked loss (:data:`templates_loss.LOSS`, the rule of
    :mod:`lora_lab.hf.training.chunked_loss`) and a Trainer that runs it when TRAIN says so."""
    from ..core.memory import CHUNKED_LOSS_MIN_VOCAB, LOSS_BLOCK_BYTES

    assert _TRAINER_CLASS in L.TRAINER_MAIN
    main = L.TRAINER_MAIN.replace(_TRAINER_CLASS,
                                  "class CountingTrainer(ChunkedLoss, TokenCounting, Trainer):")
    return (LOSS.replace("@MIN_VOCAB@", f"{CHUNKED_LOSS_MIN_VOCAB:_}")
            .replace("@BLOCK_BYTES@", f"{LOSS_BLOCK_BYTES:_}") + main)


def _script(name: str, title: str, settings: str, main: str, main_import: str) -> str:
    head = (T.HEAD.replace("@TITLE@", title).replace("@VERSION@", __version__)
            .replace("@NAME@", name).replace("@MAIN_IMPORT@", main_import)
            .replace("@EXTRA@", ", trl" if "trl" in main_import else ""))
    return head + settings + T.COMMON + TD.DATA + L.RUN + main


def export_script(adapter_spec: AdapterSpec, quant_spec=None, train_spec: TrainSpec | None = None,
                  data_spec: DataSpec | None = None, model_id: str = "builtin:tiny",
                  path="export", *, trl: bool = False, data=None,
                  device="T4") -> ExportedScript:
    """Write a standalone training script for these choices into folder ``path``.

    ``data``: what to train on: ``None`` (1,000 rows of the builtin task ``next``),
    ``"builtin:<task>"`` (1,000 rows of that task), rows in memory (a list of dicts, a dict of
    columns, a ``datasets.Dataset``/``DatasetDict`` or a DataFrame: written to
    ``data/train.jsonl`` and ``data/eval.jsonl``, split as :func:`lora_lab.prepare_dataset` splits
    them), or a local ``.json/.jsonl/.csv/.tsv`` file, a ``save_to_disk`` folder or a hub dataset
    id (kept as a reference).  ``trl=True`` also writes ``train_trl.py`` (TRL's ``SFTTrainer``).
    ``device`` is what the embedded memory estimate is for (``"T4"``, ``"A100-80GB"``, GiB).

    Raises :class:`~lora_lab.LoraLabError` for a choice the script cannot express (LoftQ, PiSSA
    on a quantized base), a spec that does not fit the model, missing data columns, or a ``path``
    that is a file.  Existing files of an earlier export in ``path`` are overwritten.
    """
    quant, train, dspec = _check_specs(adapter_spec, quant_spec, train_spec, data_spec)
    model_expr, model_note, source = _model(model_id)
    estimate = _estimate(source, adapter_spec, quant, train, dspec, device)  # checks the spec
    folder = _check_folder(path)
    if is_builtin(model_id):
        shutil.copytree(source, folder / "model", dirs_exist_ok=True)
    data_cfg, data_note, files = _data(data, dspec, folder)
    settings = _settings(model_expr, model_note, quant, adapter_spec, data_cfg, dspec, train,
                         estimate)
    scripts = {"train.py": _script("train.py", "LoRA training with transformers.Trainer", settings,
                                   _trainer_main(), TRAINER_IMPORT)}
    if trl:
        scripts["train_trl.py"] = _script("train_trl.py", "LoRA training with TRL's SFTTrainer",
                                          settings, L.TRL_MAIN, TRL_IMPORT)
    for name, text in scripts.items():
        (folder / name).write_text(text, encoding="utf-8")
    (folder / "accelerate").mkdir(exist_ok=True)
    for name, text in T.ACCELERATE.items():
        (folder / "accelerate" / name).write_text(text, encoding="utf-8")
    shown = str(path)
    commands = _commands(shown, trl)
    (folder / "README.md").write_text(_readme(adapter_spec, quant, model_id, model_note, data_note,
                                              trl, shown), encoding="utf-8")
    written = [*scripts, *(f"accelerate/{n}" for n in T.ACCELERATE), "README.md", *files]
    if is_builtin(model_id):
        written.append("model/")
    return ExportedScript(path=shown, files=tuple(written), model=model_note, data=data_note,
                          commands=commands, estimate=estimate)


def _readme(spec, quant, model_id, model_note, data_note, trl: bool, path) -> str:
    qarg = "" if quant is None else f", quant=ll.{quant!r}"
    return (T.README.replace("@TITLE@", "LoRA training script").replace("@VERSION@", __version__)
            .replace("@MODEL@", model_note).replace("@DATA@", data_note).replace("@SPEC@", repr(spec))
            .replace("@QUANT@", "none" if quant is None else quant.name)
            .replace("@COMMANDS@", "\n".join(f"# {w}\n{c}" for w, c in _commands(".", trl)))
            .replace("@MODEL_ID@", str(model_id)).replace("@QUANT_ARG@", qarg)
            .replace("@PATH@", path))
