"""``rank_sweep``: train one adapter per LoRA rank and compare them, resumably.

::

    sweep = lora_lab.rank_sweep("builtin:tiny", "reverse", ranks=(1, 2, 4, 8, 16),
                                spec=lora_lab.TrainSpec(steps=200, lr=1e-3),
                                output_dir="runs/reverse-sweep", callbacks=[dashboard])
    sweep.table          # rank, alpha, final_loss, eval_loss, accuracy, trainable_params, ...
    rank_sweep_figure(sweep.table)   # lora_lab.viz.sweep: quality and effective rank against r

For each rank r (in the order given) the sweep loads a **fresh** base model (so no run sees
another's weights), attaches ``adapter_spec`` with that r, trains with :func:`lora_lab.train` and
records: final train loss, eval loss, exact-match accuracy on the held-out ``"test"`` split when
``task_or_data`` is a builtin task name (:func:`lora_lab.task_accuracy`), trainable parameters,
training and wall time, and the effective rank the trained ΔW = s·B·A actually uses (mean and median
of :func:`lora_lab.adapter_spectra`'s Roy–Vetterli effective rank, and the median k90).  An adapter
that only ever uses 3 directions at r = 64 says r = 64 buys nothing (LoRA paper §7.2).

**Alpha.**  ``alpha_rule="scaling"`` (the default) keeps the LoRA scaling s of ``adapter_spec``
constant across ranks: α_r = s · r (or s · √r with rsLoRA), so that every rank sees ΔW scaled the
same way and the comparison is about the rank alone, at the same learning rate.
``alpha_rule="fixed"`` keeps α as given (as the LoRA paper does, §4.1: s = α/r then shrinks as r
grows).

**Resumable.**  Everything goes under ``output_dir``: rank r trains in ``output_dir/r<r>`` (also its
run name in a :class:`~lora_lab.ui.TrainingDashboard`), and when it has finished, ``row.json`` is
written there atomically, last.  A rerun with the same arguments skips every rank that has a
``row.json`` (``RankSweep.skipped``) and resumes a rank that was interrupted from its last
checkpoint.
A Stop (button, interrupt) ends the sweep after saving; the ranks finished so far are returned.
A ``row.json`` written with other settings is refused rather than mixed in.
"""

from __future__ import annotations

import gc
import html
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from ..errors import SpecError, TrainingError
from ..specs import AdapterSpec, QuantSpec, TrainSpec
from .loop import train

__all__ = ["rank_sweep", "RankSweep", "SWEEP_COLUMNS"]

SWEEP_COLUMNS = ["rank", "alpha", "scaling", "steps", "final_loss", "eval_loss", "accuracy",
                 "trainable_params", "train_s", "wall_s", "effective_rank_mean",
                 "effective_rank_median", "k90_median", "stop_reason", "adapter_path"]
ROW_FILE = "row.json"


@dataclass(frozen=True, eq=False)
class RankSweep:
    """The result of :func:`rank_sweep`.

    ``table``: one row per finished rank (columns ``SWEEP_COLUMNS``), sorted by rank.
    ``trained`` / ``skipped``: the ranks trained by this call and those read back from
    ``output_dir``.  ``stopped``: why the sweep ended early (``""`` when every rank finished).
    """

    table: pd.DataFrame
    output_dir: str
    trained: tuple
    skipped: tuple
    task: str | None = None
    stopped: str = ""
    adapter_spec: AdapterSpec = field(default=None, repr=False)

    def best(self, by: str | None = None) -> int:
        """The rank with the best ``by`` (default: accuracy when measured, else eval loss, else
        final loss; the lowest rank wins ties)."""
        t = self.table
        if by is None:
            by = next((c for c in ("accuracy", "eval_loss", "final_loss") if t[c].notna().any()),
                      "final_loss")
        col = t[by].astype(float)
        if col.notna().sum() == 0:
            raise TrainingError(f"No finished rank has a {by!r} value.", "finish at least one rank")
        best = col.max() if by == "accuracy" else col.min()
        return int(t.loc[col == best, "rank"].min())

    def __repr__(self) -> str:
        t = self.table
        ranks = ", ".join(str(r) for r in t["rank"])
        extra = f", stopped: {self.stopped}" if self.stopped else ""
        return (f"RankSweep({self.task or 'data'!r}: ranks [{ranks}] finished, trained "
                f"{list(self.trained)}, skipped {list(self.skipped)}{extra}, "
                f"in {self.output_dir!r})")

    def _repr_html_(self) -> str:
        shown = self.table.drop(columns=["adapter_path"])
        return f"<b>{html.escape(repr(self))}</b>" + shown.to_html(index=False, float_format="%.4g")


# ----------------------------------------------------------------------------- checks
def _check_ranks(ranks) -> tuple[int, ...]:
    if isinstance(ranks, int):
        ranks = (ranks,)
    try:
        ranks = tuple(ranks)
    except TypeError:
        ranks = ()
    ok = bool(ranks) and all(isinstance(r, int) and not isinstance(r, bool) and r >= 1
                             for r in ranks)
    if not ok or len(set(ranks)) != len(ranks):
        raise SpecError("rank_sweep", "ranks", ranks, "ranks must be distinct integers >= 1",
                        "pass ranks=(1, 2, 4, 8, 16)")
    return ranks


def _spec_for_rank(adapter_spec: AdapterSpec, rank: int, alpha_rule: str) -> AdapterSpec:
    if alpha_rule == "fixed":
        return adapter_spec.replace(r=rank)
    per = rank ** 0.5 if adapter_spec.use_rslora else rank
    return adapter_spec.replace(r=rank, alpha=adapter_spec.scaling * per)


def _builtin_names() -> set[str]:
    from ..hf.data.tasks import builtin_tasks, pretraining_skills

    return {*builtin_tasks(), *pretraining_skills(), "pretrain-eval"}


def _signature(model_source, quant, task, adapter_spec, spec, alpha_rule, n_train, n_eval) -> dict:
    """The settings a saved row must share with this call to be reused (JSON-normalised)."""
    # where it is written and whether the layers were compiled do not change what a row holds
    train = {k: v for k, v in asdict(spec).items() if k not in ("output_dir", "compile")}
    sig = dict(model_source=str(model_source), quant=quant.name if quant else None,
               data=task if task else "user data", adapter=adapter_spec.to_dict(), train=train,
               alpha_rule=alpha_rule, n_train=n_train if task else None,
               n_eval=n_eval if task else None)
    return json.loads(json.dumps(sig, default=str))


def _read_row(path: Path, signature: dict) -> dict | None:
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    if saved.get("signature") != signature:
        raise TrainingError(
            f"{path} was written by a sweep with other settings, so it cannot be reused.",
            "pass a new output_dir, or the same model, data, specs and alpha_rule as before")
    return saved["row"]


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, path)


def _resume_point(run_dir: Path, spec: TrainSpec) -> Path | None:
    """The run folder to resume from, when an earlier call left a checkpoint short of the end."""
    latest = run_dir / "latest"
    if spec.steps is None or not latest.exists():
        return None
    progress = run_dir / latest.read_text().strip() / "progress.json"
    if not progress.exists():
        return None
    step = int(json.loads(progress.read_text()).get("step", 0))
    return run_dir if 0 < step < spec.steps else None


# ----------------------------------------------------------------------------- one rank
def _train_one(model_source, quant, device, adapter_spec, spec, train_data, eval_data, test_rows,
               callbacks, run_dir: Path) -> dict:
    import torch

    from ..hf.adapters.attach import attach
    from ..hf.generate.batch import task_accuracy
    from ..hf.model.inspect import count_parameters
    from ..hf.model.loading import load_model
    from ..hf.spectra.analysis import adapter_spectra

    t0 = time.perf_counter()
    model, tok = load_model(model_source, quant=quant, device=device)
    torch.manual_seed(spec.seed)
    model = attach(model, adapter_spec)
    trainable = count_parameters(model).trainable
    result = train(model, tok, train_data, eval_data, spec.replace(output_dir=str(run_dir)),
                   callbacks, resume_from=_resume_point(run_dir, spec))
    accuracy = None
    if test_rows is not None and result.stop_reason == "completed":
        accuracy = task_accuracy(model, tok, test_rows)
    table = adapter_spectra(model).table
    row = dict(rank=adapter_spec.r, alpha=adapter_spec.alpha, scaling=adapter_spec.scaling,
               steps=result.steps, final_loss=result.final.get("loss"),
               eval_loss=result.final.get("eval_loss"), accuracy=accuracy,
               trainable_params=trainable, train_s=result.final.get("elapsed_s"),
               wall_s=time.perf_counter() - t0,
               effective_rank_mean=float(table["effective_rank"].mean()),
               effective_rank_median=float(table["effective_rank"].median()),
               k90_median=float(table["k90"].median()), stop_reason=result.stop_reason,
               adapter_path=result.adapter_path)
    del model, result
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()            # the next rank loads a fresh base into this memory
    return row


def _data(task_or_data, eval_data, n_train: int, n_eval: int, seed: int):
    """(task name or None, train data, eval data, test rows for accuracy or None)."""
    if isinstance(task_or_data, str) and task_or_data in _builtin_names():
        from ..hf.data.tasks import builtin_task

        test = eval_data if eval_data is not None else \
            builtin_task(task_or_data, n=n_eval, seed=seed, split="test")
        return task_or_data, builtin_task(task_or_data, n=n_train, seed=seed), test, test
    return None, task_or_data, eval_data, None


# ----------------------------------------------------------------------------- the sweep
def rank_sweep(model_source, task_or_data, ranks=(1, 2, 4, 8, 16, 32, 64),
               spec: TrainSpec = TrainSpec(), adapter_spec: AdapterSpec = AdapterSpec(),
               quant=None, eval_data=None, output_dir=None, callbacks=(), *,
               alpha_rule: str = "scaling", n_train: int = 1000, n_eval: int = 200,
               device: str | None = None) -> RankSweep:
    """Train ``adapter_spec`` at each rank in ``ranks`` on a fresh base; see the module docstring.

    ``model_source``: what :func:`lora_lab.load_model` takes (``quant`` and ``device`` are passed
    on).  ``task_or_data``: a builtin task name (``n_train`` training rows; accuracy and eval loss
    on ``n_eval`` held-out ``"test"`` rows, or on ``eval_data``) or anything :func:`lora_lab.train`
    takes.  ``spec``: the training of every rank (its ``output_dir`` is replaced by
    ``output_dir/r<rank>``).  ``output_dir``: where ranks are saved and found again on a rerun
    (default ``spec.output_dir``, else ``runs/rank-sweep-<timestamp>``).  ``callbacks``: passed to
    each ``train`` call, e.g. one dashboard for the whole sweep (each rank is a run).
    """
    ranks = _check_ranks(ranks)
    if not isinstance(adapter_spec, AdapterSpec) or not adapter_spec.is_lora:
        raise SpecError("rank_sweep", "adapter_spec", adapter_spec,
                        "a rank sweep needs a LoRA AdapterSpec (method='lora')",
                        "pass adapter_spec=lora_lab.AdapterSpec(r=8, target_modules='all-linear')")
    if not isinstance(spec, TrainSpec):
        raise SpecError("rank_sweep", "spec", spec, "spec must be a TrainSpec",
                        "pass spec=lora_lab.TrainSpec(steps=100)")
    if alpha_rule not in ("scaling", "fixed"):
        raise SpecError("rank_sweep", "alpha_rule", alpha_rule, "choose 'scaling' or 'fixed'",
                        "pass alpha_rule='scaling' (keep α/r) or 'fixed' (keep α)")
    quant = QuantSpec.parse(quant)
    callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
    out = Path(output_dir or spec.output_dir or
               Path.cwd() / "runs" / f"rank-sweep-{time.strftime('%Y%m%d-%H%M%S')}")
    task, train_data, ev, test = _data(task_or_data, eval_data, n_train, n_eval, spec.seed)
    signature = _signature(model_source, quant, task, adapter_spec, spec, alpha_rule, n_train,
                           n_eval)
    rows, trained, skipped, stopped = [], [], [], ""
    for rank in ranks:
        run_dir = out / f"r{rank}"
        saved = _read_row(run_dir / ROW_FILE, signature)
        if saved is not None:
            rows.append(saved)
            skipped.append(rank)
            continue
        ranked = _spec_for_rank(adapter_spec, rank, alpha_rule)
        row = _train_one(model_source, quant, device, ranked, spec, train_data, ev, test,
                         callbacks, run_dir)
        if row["stop_reason"] != "completed":
            stopped = f"rank {rank}: {row['stop_reason']} (rerun to resume it from its checkpoint)"
            break
        _write_json(run_dir / ROW_FILE, {"signature": signature, "row": row})
        rows.append(row)
        trained.append(rank)
    table = pd.DataFrame(rows, columns=SWEEP_COLUMNS).sort_values("rank", ignore_index=True)
    return RankSweep(table, str(out), tuple(trained), tuple(skipped), task, stopped, adapter_spec)
