"""Accuracy against LoRA rank on the builtin tasks, on ``builtin:tiny`` (CPU).

For each task (easiest first) and each rank r, attach a fresh LoRA (all linear layers, alpha = 2r),
train it for a fixed number of steps on the task's ``"train"`` split, and measure exact-match
accuracy by greedy generation on the ``"test"`` split, plus the held-out pretraining skills
(``pretrain-eval``) to show forgetting.  The base model's accuracy is the baseline of each row.
Accuracy is over ``--n-test`` (200) test prompts per task, ``builtin_task(task, n=200,
split="test")``: drawn with replacement from the held-out prompts, so a task with few distinct
prompts repeats some (``next`` has 21 distinct ones among its 200).  Prints one markdown table,
then the JSON line of ``benchmarks/_report.py`` (every accuracy; no target: this is a measurement).

    python benchmarks/builtin_tasks.py                  # full grid: 36 runs of ~15-20 s on a quiet CPU
    python benchmarks/builtin_tasks.py --ranks 1 8 32 --steps 200 --tasks upper reverse
    python benchmarks/builtin_tasks.py --quick          # upper at r=8, 150 steps, 50 test prompts
"""

from __future__ import annotations

import argparse
import time

import _report
import torch

import lora_lab as ll
from lora_lab.hf.data.prepare import pad_batch, prepare_dataset
from lora_lab.hf.data.tasks import builtin_task, builtin_tasks
from lora_lab.hf.generate.batch import task_accuracy


def finetune(task: str, r: int, steps: int, batch_size: int, lr: float, seed: int = 0):
    """A fresh ``builtin:tiny`` with a rank-``r`` LoRA trained ``steps`` steps on ``task``."""
    torch.manual_seed(seed)
    model, tok = ll.load_model("builtin:tiny", device="cpu")
    model = ll.attach(model, ll.AdapterSpec(r=r, target_modules="all-linear"))
    data = prepare_dataset(builtin_task(task, n=steps * batch_size, seed=seed), tok,
                           ll.DataSpec(eval_fraction=0)).train
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * (1 - s / steps))
    model.train()
    for step in range(steps):
        rows = data.select(range(step * batch_size, (step + 1) * batch_size))
        batch = pad_batch(list(rows), tok.pad_token_id)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return model, tok, loss.item()


def quant_structure() -> str:
    """Per-layer NF4 relative error and excess kurtosis: trained ``tiny`` against ``tiny-random``.

    NF4 (QLoRA §3) is optimal for Gaussian weights, so random init gives the same error everywhere;
    trained weights are heavy-tailed (kurtosis > 0, outliers), which NF4's fixed levels fit worse.
    """
    import bitsandbytes.functional as F

    def rows(name):
        model, _ = ll.load_model(name, device="cpu")
        out = {}
        for mod_name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and "layers." in mod_name:
                w = mod.weight.detach().float()
                q, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
                err = (F.dequantize_4bit(q, state) - w).norm() / w.norm()
                z = (w - w.mean()) / w.std()
                out[mod_name.replace("model.layers.", "")] = (float(err), float((z ** 4).mean() - 3))
        return out

    trained, rand = rows("builtin:tiny"), rows("builtin:tiny-random")
    lines = ["| layer | NF4 rel. error tiny | tiny-random | excess kurtosis tiny | tiny-random |",
             "|---|---|---|---|---|"]
    for k in trained:
        (e1, k1), (e0, k0) = trained[k], rand[k]
        lines.append(f"| {k} | {e1:.4f} | {e0:.4f} | {k1:.2f} | {k0:.2f} |")
    spread = lambda d: (min(v[0] for v in d.values()), max(v[0] for v in d.values()))  # noqa: E731
    lines.append(f"\nNF4 error range: tiny {spread(trained)[0]:.4f}-{spread(trained)[1]:.4f}, "
                 f"tiny-random {spread(rand)[0]:.4f}-{spread(rand)[1]:.4f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=builtin_tasks())
    ap.add_argument("--ranks", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads: 2, or 1 with --quick (1 is faster on a busy CPU)")
    ap.add_argument("--n-test", type=int, default=200, help="test prompts per task (200)")
    ap.add_argument("--quant", action="store_true", help="print the per-layer NF4 table and stop")
    ap.add_argument("--quick", action="store_true", help="upper at r=8, 150 steps, 50 test prompts")
    args = ap.parse_args(argv)
    if args.quick:
        args.tasks, args.ranks, args.steps, args.n_test = ["upper"], [8], 150, 50
    args.threads = args.threads or (1 if args.quick else 2)
    torch.set_num_threads(args.threads)
    if args.quant:
        print(quant_structure())
        return

    base, tok = ll.load_model("builtin:tiny", device="cpu")
    pre = ll.builtin_task("pretrain-eval", n=args.n_test, split="test")
    base_pre = task_accuracy(base, tok, pre)
    head = "| task | base | " + " | ".join(f"r={r}" for r in args.ranks) + " |"
    lines = [f"steps={args.steps}, batch={args.batch_size}, lr={args.lr}, LoRA on all linear layers, "
             f"alpha=2r; accuracy on {args.n_test} held-out prompts (exact match, greedy); "
             f"in brackets: train seconds / pretrain-eval accuracy after (base {base_pre:.0%})", "",
             head, "|" + "---|" * (len(args.ranks) + 2)]
    print("\n".join(lines), flush=True)
    acc_all = {"pretrain-eval base": base_pre}
    for task in args.tasks:
        test = builtin_task(task, n=args.n_test, split="test")
        acc_all[f"{task} base"] = task_accuracy(base, tok, test)
        cells = [task, f"{acc_all[f'{task} base']:.0%}"]
        for r in args.ranks:
            t0 = time.perf_counter()
            model, _, _ = finetune(task, r, args.steps, args.batch_size, args.lr)
            wall = time.perf_counter() - t0
            acc, forget = task_accuracy(model, tok, test), task_accuracy(model, tok, pre)
            acc_all[f"{task} r={r}"], acc_all[f"{task} r={r} pretrain-eval"] = acc, forget
            cells.append(f"{acc:.0%} ({wall:.0f}s/{forget:.0%})")
        print("| " + " | ".join(cells) + " |", flush=True)
    _report.report("builtin_tasks", acc_all, {}, quick=args.quick,
                   extra={"n_test": args.n_test, "steps": args.steps, "batch_size": args.batch_size,
                          "lr": args.lr, "threads": args.threads})


if __name__ == "__main__":
    main()
