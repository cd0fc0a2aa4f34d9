"""What does lora_lab's training loop, with its live dashboard, cost against a plain loop and Trainer?

Three setups train the same model (``--model``: ``builtin:tiny`` by default, ``builtin:smollm2`` for
the real 135 M-parameter model, or a folder), LoRA r=8 on all linear layers, the same data
(``--batch`` × ``--seq`` tokens of random ids), steps, learning rate and seed, on CPU, and all three
with the same optimizer implementation (``--optimizer``): torch's fused AdamW by default (what
``lora_lab.train`` and the Trainer use), or torch's unfused AdamW (``fused=False``) on all three:

1. ``plain``:   a hand-written PyTorch + peft loop (AdamW, grad clipping at 1.0), the baseline;
2. ``lora_lab``: ``lora_lab.train`` with a ``TrainingDashboard`` attached (headless: the figure
   is a real FigureWidget, nobody looks at it); it builds fused AdamW itself (``--optimizer
   unfused`` makes it build ``fused=False`` instead, by wrapping ``lora_lab.train.optim._adamw``);
3. ``trainer``: ``transformers.Trainer`` with the same settings and ``optim="adamw_torch_fused"``
   (``"adamw_torch"`` for ``--optimizer unfused``).

Each child records the optimizer its setup really built (``torch.optim.AdamW.defaults["fused"]``)
and the parent refuses to compare if the three differ.

Each setup runs in its own subprocess (clean peak RSS), ``--repeats`` times, interleaved, and the
median is reported.  Throughput is measured over the steps after ``--warmup`` steps, from each
loop's own step-end timestamps, per second of wall time and per second of the process's CPU time
(the second is what to trust on a machine shared with other jobs).  Targets (issue 4):
(2)/(1) >= 0.97, (2)/(3) >= 1.0, peak RSS (2)/(1) <= 1.05.

    python benchmarks/train_overhead.py [--model builtin:tiny] [--steps 40] [--warmup 5] [--repeats 3]
                                        [--batch 8] [--seq 128] [--threads N]
    python benchmarks/train_overhead.py --model builtin:smollm2 --steps 8 --warmup 2 --seq 64
    python benchmarks/train_overhead.py --quick        # 12 steps (3 warm-up), batch 4x64, 1 repeat, 1 thread
    python benchmarks/train_overhead.py --optimizer unfused

The last line of the output is the JSON line of ``benchmarks/_report.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import _report

SEQ, BATCH, R, LR = 128, 8, 8, 1e-4
MODEL = "builtin:tiny"
OPTIMIZER = "fused"           # or "unfused": the same AdamW implementation on all three sides
USED: dict = {}               # the optimizer each setup really built: {"fused": bool}


def _record(opt):
    """Note which AdamW implementation ``opt`` is (``defaults["fused"]``: True, False or None)."""
    USED["optimizer"] = f"{type(opt).__name__}(fused={bool(opt.defaults.get('fused'))})"
    return opt


def _model():
    import torch

    import lora_lab as ll

    name = MODEL if MODEL != "builtin:tiny" or MODEL in ll.builtin_names() else "builtin:tiny-random"
    model, tok = ll.load_model(name, device="cpu")
    try:
        attach = ll.attach
    except ImportError:
        from lora_lab.hf.adapters.attach import attach
    torch.manual_seed(0)
    return attach(model, ll.AdapterSpec(r=R, target_modules="all-linear")), tok, name


def _rows(vocab: int, n: int) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (n, SEQ), generator=g).tolist()
    return [{"input_ids": x, "attention_mask": [1] * SEQ, "labels": list(x)} for x in ids]


def _rate(times: list[tuple[float, float]], warmup: int, clock: int) -> float:
    """Tokens per second of wall (clock 0) or process CPU time (clock 1) between the end of step
    ``warmup`` and the end of the last step."""
    return (len(times) - warmup) * BATCH * SEQ / (times[-1][clock] - times[warmup - 1][clock])


def run_plain(model, tok, rows, steps):
    import torch

    from lora_lab.hf.data.prepare import pad_batch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = _record(torch.optim.AdamW(params, lr=LR, fused=OPTIMIZER == "fused"))
    model.train()
    times = []
    for step in range(steps):
        batch = pad_batch(rows[(step * BATCH) % len(rows):][:BATCH], tok.pad_token_id)
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss)
        times.append((time.perf_counter(), time.process_time()))
    return times


def run_lora_lab(model, tok, rows, steps):
    import importlib

    import lora_lab as ll
    from lora_lab.train.loop import train
    from lora_lab.ui.dashboard import TrainingDashboard

    optim = importlib.import_module("lora_lab.train.optim")  # ll.train, the function, shadows it
    build = optim._adamw      # lora_lab's own AdamW constructor; only the fused flag is overridden
    optim._adamw = lambda groups, spec, fused: _record(
        build(groups, spec, fused if OPTIMIZER == "fused" else False))
    times = []

    class Clock:
        def on_step(self, state, control):
            times.append((time.perf_counter(), time.process_time()))

    dash = PREPARED.get("dashboard") or TrainingDashboard()
    spec = ll.TrainSpec(steps=steps, batch_size=BATCH, lr=LR, schedule="constant",
                        output_dir=tempfile.mkdtemp(prefix="bench-lora-lab-"))
    try:
        res = train(model, tok, rows, spec=spec, callbacks=[dash, Clock()])
    finally:
        shutil.rmtree(spec.output_dir, ignore_errors=True)
    step_s = res.final["elapsed_s"] / res.steps
    run_lora_lab.dashboard_share = dash.overhead["step"] / res.steps / step_s  # per-step share
    run_lora_lab.dashboard_fixed_s = dash.overhead["begin"] + dash.overhead["end"]
    return times


def run_trainer(model, tok, rows, steps):
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    times = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            times.append((time.perf_counter(), time.process_time()))

        def on_train_begin(self, args, state, control, optimizer=None, **kw):
            _record(optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer)

    args = TrainingArguments(output_dir=tempfile.mkdtemp(prefix="bench-trainer-"), max_steps=steps,
                             per_device_train_batch_size=BATCH, learning_rate=LR,
                             lr_scheduler_type="constant", report_to=[], use_cpu=True,
                             save_strategy="no", eval_strategy="no", logging_steps=steps,
                             disable_tqdm=True, dataloader_num_workers=0, seed=0,
                             optim="adamw_torch_fused" if OPTIMIZER == "fused" else "adamw_torch")
    try:
        Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                callbacks=[Clock()]).train()
    finally:
        shutil.rmtree(args.output_dir, ignore_errors=True)
    return times


SETUPS = {"plain": run_plain, "lora_lab": run_lora_lab, "trainer": run_trainer}


IMPORTS = {"plain": ("lora_lab.hf.data.prepare",),
           "lora_lab": ("lora_lab.ui.dashboard", "lora_lab.train.loop"),
           "trainer": ("transformers.trainer", "datasets")}
PREPARED: dict = {}  # objects made before the RSS baseline (the dashboard and its FigureWidget)


def child(setup: str, steps: int, warmup: int) -> dict:
    """One setup in a fresh process.  ``ready_rss_mb``: RSS once the model is loaded, the setup's
    libraries imported and the dashboard made; ``growth_mb`` = peak - ready is what training itself
    added."""
    import importlib

    from lora_lab.train.measure import peak_rss_mb, rss_mb

    model, tok, name = _model()
    for module in IMPORTS[setup]:
        importlib.import_module(module)
    if setup == "lora_lab":
        from lora_lab.ui.dashboard import TrainingDashboard

        PREPARED["dashboard"] = TrainingDashboard()
    ready = rss_mb()
    times = SETUPS[setup](model, tok, _rows(len(tok), steps * BATCH), steps)
    peak = peak_rss_mb()
    return {"setup": setup, "model": name, "tokens_per_s": _rate(times, warmup, 0),
            "tokens_per_cpu_s": _rate(times, warmup, 1),
            "peak_rss_mb": peak, "ready_rss_mb": ready, "growth_mb": peak - ready,
            "steps": len(times), "optimizer": USED.get("optimizer"),
            "dashboard_share": getattr(SETUPS[setup], "dashboard_share", None),
            "dashboard_fixed_s": getattr(SETUPS[setup], "dashboard_fixed_s", None)}


def main() -> None:
    global MODEL, BATCH, SEQ, OPTIMIZER
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads in each child")
    ap.add_argument("--model", default=MODEL, help="builtin name or folder (builtin:tiny)")
    ap.add_argument("--batch", type=int, default=BATCH, help="rows per step (8)")
    ap.add_argument("--seq", type=int, default=SEQ, help="tokens per row (128)")
    ap.add_argument("--optimizer", choices=("fused", "unfused"), default="fused",
                    help="AdamW implementation, the same on all three sides (fused)")
    ap.add_argument("--quick", action="store_true",
                    help="12 steps (3 warm-up), batch 4x64, 1 repeat, 1 thread: a smoke run, ratios noisy")
    ap.add_argument("--child", choices=list(SETUPS), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.quick:     # 1 thread unless told: OpenMP threads that spin on a busy CPU swamp the ratios
        a.steps, a.warmup, a.repeats, a.batch, a.seq = 12, 3, 1, 4, 64
        a.threads = a.threads or 1
    MODEL, BATCH, SEQ, OPTIMIZER = a.model, a.batch, a.seq, a.optimizer
    if a.child:
        if a.threads:
            import torch

            torch.set_num_threads(a.threads)
        print("RESULT " + json.dumps(child(a.child, a.steps, a.warmup)), flush=True)
        return
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    results: dict[str, list[dict]] = {k: [] for k in SETUPS}
    for rep in range(a.repeats):
        for setup in SETUPS:
            cmd = [sys.executable, __file__, "--child", setup, "--steps", str(a.steps),
                   "--warmup", str(a.warmup), "--model", a.model, "--batch", str(a.batch),
                   "--seq", str(a.seq), "--optimizer", a.optimizer] + (
                       ["--threads", str(a.threads)] if a.threads else [])
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
            res = json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:])
            results[setup].append(res)
            print(f"  repeat {rep + 1} {setup:9s} {res['tokens_per_s']:9,.0f} tokens/s  "
                  f"{res['tokens_per_cpu_s']:9,.0f} tokens/CPU-s  "
                  f"peak RSS {res['peak_rss_mb']:7.1f} MiB  (training added "
                  f"{res['growth_mb']:6.1f})", flush=True)
    used = {k: sorted({r["optimizer"] for r in v}) for k, v in results.items()}
    if len({tuple(v) for v in used.values()}) != 1:
        sys.exit(f"the setups built different optimizers, no fair comparison: {used}")
    keys = ("tokens_per_s", "tokens_per_cpu_s", "peak_rss_mb", "growth_mb")
    med = {k: {m: statistics.median(r[m] for r in v) for m in keys} for k, v in results.items()}
    print(f"\nmodel {results['plain'][0]['model']}, LoRA r={R} all-linear, batch {BATCH}x{SEQ}, "
          f"{a.steps} steps ({a.warmup} warm-up), median of {a.repeats}, "
          f"torch threads {a.threads or 'default'}, optimizer on all three: {used['plain'][0]}")
    for i, k in enumerate(SETUPS, 1):
        print(f"({i}) {k:9s} {med[k]['tokens_per_s']:9,.0f} tokens/s  "
              f"{med[k]['tokens_per_cpu_s']:9,.0f} tokens/CPU-s   peak RSS "
              f"{med[k]['peak_rss_mb']:7.1f} MiB   added by training {med[k]['growth_mb']:6.1f} MiB")
    ratio = lambda a, b, m: med[a][m] / med[b][m]  # noqa: E731
    share = statistics.median(r["dashboard_share"] for r in results["lora_lab"])
    fixed = statistics.median(r["dashboard_fixed_s"] for r in results["lora_lab"])
    print(f"dashboard: {100 * share:.2f}% of each step's time (drawing + polling), plus "
          f"{fixed * 1e3:.0f} ms once per run (building the figure, final draw)")
    for m, what in (("tokens_per_s", "wall"), ("tokens_per_cpu_s", "CPU")):
        print(f"(2)/(1) throughput ({what:4s}) {ratio('lora_lab', 'plain', m):.3f}  (target >= 0.97)"
              f"    (2)/(3) {ratio('lora_lab', 'trainer', m):.3f}  (target >= 1.0)")
    print(f"(2)/(1) peak RSS   {ratio('lora_lab', 'plain', 'peak_rss_mb'):.3f}  (target <= 1.05; "
          f"includes the dashboard: importing ipywidgets and plotly, building the FigureWidget)")
    print(f"training memory above the post-import RSS: (1) {med['plain']['growth_mb']:.1f} MiB, "
          f"(2) {med['lora_lab']['growth_mb']:.1f} MiB, (3) {med['trainer']['growth_mb']:.1f} MiB")
    _report.report(
        "train_overhead",
        {"lora_lab/plain tokens_per_cpu_s": ratio("lora_lab", "plain", "tokens_per_cpu_s"),
         "lora_lab/trainer tokens_per_cpu_s": ratio("lora_lab", "trainer", "tokens_per_cpu_s"),
         "lora_lab/plain tokens_per_s": ratio("lora_lab", "plain", "tokens_per_s"),
         "lora_lab/trainer tokens_per_s": ratio("lora_lab", "trainer", "tokens_per_s"),
         "lora_lab/plain peak_rss": ratio("lora_lab", "plain", "peak_rss_mb")},
        {"lora_lab/plain tokens_per_cpu_s": ">= 0.97", "lora_lab/trainer tokens_per_cpu_s": ">= 1.0",
         "lora_lab/plain peak_rss": "<= 1.05"},
        quick=a.quick,
        extra={"model": results["plain"][0]["model"], "optimizer": used["plain"][0],
               "batch": BATCH, "seq": SEQ, "steps": a.steps, "warmup": a.warmup, "repeats": a.repeats,
               "threads": a.threads, "medians": med, "dashboard_share": share})


if __name__ == "__main__":
    main()
