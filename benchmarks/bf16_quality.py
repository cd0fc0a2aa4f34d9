"""Do bf16 runs on a CPU learn as much as fp32 runs?  Held-out accuracy, fp32 against bf16 (issue 22).

bf16 keeps 8 significant bits (fp32: 24), so under ``torch.autocast("cpu", dtype=torch.bfloat16)``
every matrix product rounds its inputs to about 0.4%; the adapter and AdamW stay fp32.  Whether that
costs accuracy is measured here, through ``lora_lab.train`` (the same loop a notebook runs):

1. **builtin:tiny** on builtin tasks (default ``upper`` and ``subtract``: one that LoRA r=8 solves,
   one it half solves, so a loss of precision would show), LoRA r=8 on all linear layers,
   ``--steps`` (300) steps of ``--batch`` (16) rows at lr 3e-3 (linear decay, 20 warmup steps), precision
   forced to ``"fp32"`` and to ``"bf16"`` (``"auto"`` keeps this 128-wide model in fp32), for each
   of ``--seeds``.  Accuracy: exact match of greedy answers on ``--n-test`` held-out prompts
   (``task_accuracy``).  The tolerance is judged against the noise floor: how far two fp32 runs
   that differ only in their seed land apart.
2. **builtin:smollm2** on ``capitals`` (the reply-format task of notebook 07: answer in one line of
   JSON), LoRA r=8 on all linear layers, ``--smol-steps`` (30) steps of 8 rows at lr 1e-3: ``fp32``
   (``load_model(dtype="fp32")`` + ``precision="fp32"``) against ``auto`` (``dtype="auto"`` +
   ``precision="auto"``: a bf16 base and bf16 autocast on a CPU with native bf16).  Measured: the
   share of the 15 held-out prompts answered in the format (``follows_format``) and exactly right,
   and the held-out loss (fp32 evaluation of each trained model, so both are judged the same way).
   ``compiled`` is ``auto`` with ``TrainSpec(compile=True)`` (the decoder layers through torch.compile).
   ``--qlora`` adds the same setups on an NF4 base (4-bit matmuls in fp32 or, by the rule, bf16).

Prints a table and the JSON line of ``benchmarks/_report.py``: ``*_bf16_minus_fp32`` accuracy
differences (in accuracy points, 1.0 = 100%), the fp32 seed spread, and the ratio of held-out
losses; each run's numbers (and its training seconds, which on a shared machine say little: see
``benchmarks/cpu_speed.py`` for speed) are in ``extra``.  There is no pass/fail target: the numbers
say what tolerance bf16 holds to.

    python benchmarks/bf16_quality.py                     # tiny: 2 tasks x 3 seeds; smollm2: 30 steps
    python benchmarks/bf16_quality.py --quick             # upper, 1 seed, 120 steps; smollm2 8 steps
    python benchmarks/bf16_quality.py --no-smollm2 --tasks upper subtract reverse
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import lora_lab as ll
from lora_lab.hf.data.chat_tasks import follows_format
from lora_lab.hf.data.prepare import pad_batch, prepare_dataset
from lora_lab.hf.data.tasks import builtin_task
from lora_lab.hf.generate.batch import task_accuracy, task_completions
from lora_lab.hf.model.device import cpu_bf16_native

# setup -> (load dtype, precision, TrainSpec.compile)
SMOL = {"fp32": ("fp32", "fp32", False), "auto": ("auto", "auto", False), "compiled": ("auto", "auto", True)}


def train_run(model, tok, data, steps: int, batch: int, lr: float, precision: str, seed: int,
              warmup: int, compile: bool = False) -> ll.TrainResult:
    with tempfile.TemporaryDirectory() as out:
        spec = ll.TrainSpec(steps=steps, batch_size=batch, lr=lr, schedule="linear", warmup_steps=warmup,
                            precision=precision, seed=seed, output_dir=out, compile=compile)
        return ll.train(model, tok, data, None, spec)


def tiny_accuracy(task: str, precision: str, seed: int, args) -> tuple[float, float]:
    """(held-out accuracy, final train loss) of one LoRA run on builtin:tiny."""
    torch.manual_seed(seed)
    model, tok = ll.load_model("builtin:tiny", device="cpu")
    model = ll.attach(model, ll.AdapterSpec(r=8, target_modules="all-linear"))
    data = prepare_dataset(builtin_task(task, n=args.steps * args.batch, seed=seed), tok,
                           ll.DataSpec(eval_fraction=0))
    res = train_run(model, tok, data, args.steps, args.batch, 3e-3, precision, seed, 20)
    test = builtin_task(task, n=args.n_test, split="test")
    return task_accuracy(model, tok, test), float(res.final["loss"])


@torch.no_grad()
def held_out_loss(model, tok, rows) -> float:
    """Mean loss per supervised token on ``rows`` in fp32 (no autocast; a bf16 base is upcast)."""
    from lora_lab.hf.adapters.merge import _fp32_forward

    data = prepare_dataset(rows, tok, ll.DataSpec(max_length=96, eval_fraction=0)).train
    batch = pad_batch(list(data), tok.pad_token_id)
    model.eval()
    with _fp32_forward(model):
        out = model(**batch)
    return float(out.loss)


def smollm2_run(setup: str, quant, args) -> dict:
    dtype, precision, compiled = SMOL[setup]
    if quant and dtype == "auto":
        dtype = None  # a 4-bit base keeps its fp32 parts; its layers compute by the "auto" rule
    model, tok = ll.load_model("builtin:smollm2", quant, device="cpu", dtype=dtype)
    torch.manual_seed(0)
    model = ll.attach(model, ll.AdapterSpec(r=8, target_modules="all-linear"), name="json")
    rows = builtin_task("capitals", n=args.smol_steps * 8, seed=0)
    data = prepare_dataset(rows, tok, ll.DataSpec(max_length=96, eval_fraction=0))
    t0 = time.perf_counter()
    res = train_run(model, tok, data, args.smol_steps, 8, 1e-3, precision, 0, 2, compiled)
    wall = time.perf_counter() - t0
    test = builtin_task("capitals", n=15, split="test")
    after = task_completions(model, tok, test, max_new_tokens=16)
    return {"precision": res.final["precision"], "base": str(model.get_base_model().dtype),
            "format": sum(map(follows_format, after)) / len(after),
            "exact": sum(a == r for a, r in zip(after, test["response"])) / len(after),
            "train_loss": float(res.final["loss"]), "held_out_loss": held_out_loss(model, tok, test),
            "train_s": wall}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="*", default=["upper", "subtract"], help="none: skip builtin:tiny")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--smol-steps", type=int, default=30)
    ap.add_argument("--no-smollm2", action="store_true")
    ap.add_argument("--qlora", action="store_true", help="also compare on an NF4 base (smollm2)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for builtin:tiny (1)")
    ap.add_argument("--quick", action="store_true", help="upper, one seed, 120 steps; smollm2 8 steps")
    args = ap.parse_args(argv)
    if args.quick:
        args.tasks, args.seeds, args.steps, args.n_test, args.smol_steps = ["upper"], [0], 120, 50, 8
    native = cpu_bf16_native()
    print(f"CPU native bf16: {native}", flush=True)
    ratios, extra = {}, {"cpu_bf16_native": native, "steps": args.steps, "batch": args.batch,
                         "seeds": args.seeds, "n_test": args.n_test, "smol_steps": args.smol_steps}

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or 1)   # a 128-wide model gains nothing from a second thread
    print("| model | task | fp32 accuracy (per seed) | bf16 accuracy (per seed) | bf16 − fp32 (mean) | "
          "fp32 seed spread |\n|---|---|---|---|---|---|", flush=True)
    for task in args.tasks:
        acc = {p: [tiny_accuracy(task, p, s, args)[0] for s in args.seeds] for p in ("fp32", "bf16")}
        diff = statistics.mean(acc["bf16"]) - statistics.mean(acc["fp32"])
        pairs = [abs(a - b) for a, b in zip(acc["bf16"], acc["fp32"])]
        spread = max(acc["fp32"]) - min(acc["fp32"])
        ratios[f"tiny_{task}_bf16_minus_fp32"] = round(diff, 4)
        ratios[f"tiny_{task}_max_seedwise_gap"] = round(max(pairs), 4)
        ratios[f"tiny_{task}_fp32_seed_spread"] = round(spread, 4)
        extra[f"tiny_{task}_fp32"], extra[f"tiny_{task}_bf16"] = acc["fp32"], acc["bf16"]
        print(f"| builtin:tiny | {task} | {', '.join(f'{a:.1%}' for a in acc['fp32'])} | "
              f"{', '.join(f'{a:.1%}' for a in acc['bf16'])} | {diff:+.1%} | {spread:.1%} |", flush=True)
    torch.set_num_threads(threads)

    if not args.no_smollm2:
        from lora_lab.hf.model import smollm2

        if not smollm2.available():
            print(f"builtin:smollm2 skipped: {smollm2.INSTALL}")
        else:
            print("\n| model | base | setup | precision | base dtype | JSON format | exact | train loss | "
                  "held-out loss | train s |\n|---|---|---|---|---|---|---|---|---|---|", flush=True)
            for quant in (None, "nf4") if args.qlora else (None,):
                runs = {s: smollm2_run(s, quant, args) for s in SMOL}
                for s, r in runs.items():
                    print(f"| builtin:smollm2 | {quant or 'lora'} | {s} | {r['precision']} | {r['base']} | "
                          f"{r['format']:.0%} | {r['exact']:.0%} | {r['train_loss']:.3f} | "
                          f"{r['held_out_loss']:.3f} | {r['train_s']:.0f} |", flush=True)
                key, fp32 = f"smollm2_{quant or 'lora'}", runs["fp32"]
                for s in ("auto", "compiled"):
                    r = runs[s]
                    ratios[f"{key}_format_{s}_minus_fp32"] = round(r["format"] - fp32["format"], 4)
                    ratios[f"{key}_exact_{s}_minus_fp32"] = round(r["exact"] - fp32["exact"], 4)
                    ratios[f"{key}_held_out_loss_{s}_over_fp32"] = round(
                        r["held_out_loss"] / fp32["held_out_loss"], 4)
                for s, r in runs.items():
                    extra[f"{key}_{s}"] = {k: round(v, 4) if isinstance(v, float) else v
                                           for k, v in r.items()}

    try:
        from _report import report
    except ImportError:  # run from elsewhere than benchmarks/
        import sys

        sys.path.insert(0, __file__.rsplit("/", 1)[0])
        from _report import report
    return report("bf16_quality", ratios, {}, quick=args.quick, extra=extra)


if __name__ == "__main__":
    main()
