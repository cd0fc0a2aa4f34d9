"""Padding each batch to a multiple of 8 tokens against padding to the longest row: peak RSS and tokens/s.

``TrainSpec.pad_to_multiple_of`` (default 8) rounds a batch's length up, so a run sees a few
shapes rather than one per length, each a multiple of 8.  The claim: on a CPU that lowers the
training peak RSS.  Its price is the extra padding computed (tokens/s counts only real tokens, so
it shows up here): on notebook 07's rows (45–53 tokens, batches of 4) the model computes 12.8%
more tokens than are real against 3.5% padded to the longest row, so tokens/s may fall by up to
about 8%; the target allows 10%.

Protocol: notebook 07's training cell (SmolLM2-135M, bf16 weights and autocast, LoRA r=8
all-linear, batch 4 of the capitals task at ``max_length=96``, gradient checkpointing, chunked
loss of 64 tokens, lr 1e-3, no dashboard).  Each side runs ``--steps`` steps in a fresh
subprocess (the same warm-up: the first 5 steps are not timed), the sides interleaved
``--repeats`` times.  Per run: ``ru_maxrss`` of the subprocess and the median tokens/s of steps
after the first five.  Reported: the median over repeats of each, and the ratios
padded/unpadded.  Use ``--model builtin:tiny`` for a quick run without the real model.

Usage: python benchmarks/padding.py [--steps 40] [--repeats 3] [--multiple 8] [--quick]
"""

from __future__ import annotations

import argparse
import statistics

from _child import run_child
from _report import report

CHILD = r"""
import json, resource, sys, time
import torch
import lora_lab as ll
model_id, multiple, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
cpu_bf16 = model_id == "builtin:smollm2"
model, tok = ll.load_model(model_id, device="cpu", dtype="bf16" if cpu_bf16 else None)
rows = ll.builtin_task("capitals" if cpu_bf16 else "upper", n=396, seed=0)
data = ll.prepare_dataset(rows, tok, ll.DataSpec(max_length=96, eval_fraction=0.0))
model = ll.attach(model, ll.AdapterSpec(r=8, target_modules="all-linear"))
spec = ll.TrainSpec(steps=steps, batch_size=4, lr=1e-3, warmup_steps=2, seed=0, gradient_checkpointing=True,
                    chunked_loss=True, loss_chunk_size=64, precision="bf16" if cpu_bf16 else "fp32",
                    pad_to_multiple_of=multiple if multiple > 1 else None, output_dir=sys.argv[4])
res = ll.train(model, tok, data, spec=spec)
tps = [r["tokens_per_s"] for r in res.rows[5:]]
print("__RESULT__" + json.dumps({"maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                 "tokens_per_s": sorted(tps)[len(tps) // 2], "loss": res.final["loss"]}))
"""


def run(model: str, multiple: int, steps: int, out: str) -> dict:
    return run_child(CHILD, model, str(multiple), str(steps), out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="builtin:smollm2")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--multiple", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="builtin:tiny, 15 steps, 1 repeat")
    ap.add_argument("--out", default="/tmp/lora_lab_padding_bench")
    args = ap.parse_args()
    if args.quick:
        args.model, args.steps, args.repeats = "builtin:tiny", 15, 1
    sides: dict[str, list[dict]] = {"longest": [], f"multiple_{args.multiple}": []}
    for i in range(args.repeats):
        for name, multiple in (("longest", 1), (f"multiple_{args.multiple}", args.multiple)):
            r = run(args.model, multiple, args.steps, args.out)
            sides[name].append(r)
            print(f"repeat {i + 1} {name:>12}: peak RSS {r['maxrss_mib']:7.0f} MiB, "
                  f"{r['tokens_per_s']:6.0f} tokens/s, final loss {r['loss']:.4f}", flush=True)
    med = {name: {k: statistics.median(r[k] for r in rs) for k in ("maxrss_mib", "tokens_per_s")}
           for name, rs in sides.items()}
    a, b = med["longest"], med[f"multiple_{args.multiple}"]
    print(f"median: peak RSS {a['maxrss_mib']:.0f} -> {b['maxrss_mib']:.0f} MiB "
          f"({b['maxrss_mib'] - a['maxrss_mib']:+.0f}), "
          f"tokens/s {a['tokens_per_s']:.0f} -> {b['tokens_per_s']:.0f}")
    report("padding", {"peak_rss_padded_vs_longest": b["maxrss_mib"] / a["maxrss_mib"],
                       "tokens_per_s_padded_vs_longest": b["tokens_per_s"] / a["tokens_per_s"]},
           {"peak_rss_padded_vs_longest": "< 1.0", "tokens_per_s_padded_vs_longest": ">= 0.90"},
           quick=args.quick, extra={"model": args.model, "steps": args.steps, "repeats": args.repeats,
                                    "multiple": args.multiple, "medians": med})


if __name__ == "__main__":
    main()
