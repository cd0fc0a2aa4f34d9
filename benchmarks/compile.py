"""``TrainSpec(compile=True)`` against eager on notebook 07's training cell: step time, the first step's
compilation (cold and warm cache), the whole run's wall time, and the peak memory of the process tree.

``compile=True`` runs each decoder layer through ``torch.compile`` (TorchInductor), which fuses the
norms, casts, rotary and activation kernels between the matrix products.  What it costs is paid in
the first step (tracing, and building C++ kernels in inductor's worker processes) and again once
when a second sequence length makes dynamo compile a dynamic-shape graph; inductor keeps the
kernels in an on-disk cache, so a later run (or kernel restart) compiles in seconds.

Protocol: notebook 07's training cell (SmolLM2-135M, bf16 weights and autocast, LoRA r=8
all-linear, batch 4 of the capitals task at ``max_length=96``, padded to 8, gradient
checkpointing, chunked loss of 64 tokens, lr 1e-3, no dashboard), ``--steps`` steps, each run in a
fresh subprocess with the same threads.  Three sides, interleaved ``--repeats`` times:

* ``eager``: ``compile=False``;
* ``cold``: ``compile=True`` with an empty inductor cache (``TORCHINDUCTOR_CACHE_DIR`` a new folder);
* ``warm``: ``compile=True`` again on the cache ``cold`` just filled.

Per run: wall time from the start of ``train`` to its last step, the first step, the mean step
after step 5 (the same warm-up on every side), the graphs dynamo captured, and the peak RSS of the
process and its children (inductor's compile workers), sampled every 50 ms.  Reported: medians,
and the ratios warm/eager (steady step time and whole-run wall time).  Targets: a steady step at
least 1.2× faster than eager, and the warm run's whole wall time below eager's.

Usage: python benchmarks/compile.py [--steps 40] [--repeats 2] [--quick]   (--quick: builtin:tiny)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

from _child import run_child
from _report import report

CHILD = r"""
import json, sys, threading, time
import psutil, torch
import lora_lab as ll
from torch._dynamo.utils import counters
model_id, compile_, steps, out = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), sys.argv[4]
peak = [0.0]
def sample():
    me = psutil.Process()
    while True:
        try:
            rss = me.memory_info().rss + sum(c.memory_info().rss for c in me.children(recursive=True))
            peak[0] = max(peak[0], rss / 2**20)
        except psutil.Error:
            pass
        time.sleep(0.05)
threading.Thread(target=sample, daemon=True).start()
real = model_id == "builtin:smollm2"
model, tok = ll.load_model(model_id, device="cpu", dtype="auto")
rows = ll.builtin_task("capitals" if real else "upper", n=396, seed=0)
data = ll.prepare_dataset(rows, tok, ll.DataSpec(max_length=96, eval_fraction=0.0))
torch.manual_seed(0)  # the same LoRA init on every side
model = ll.attach(model, ll.AdapterSpec(r=8, target_modules="all-linear"))
times = []
class Clock(ll.Callback):
    def on_step(self, state, control):
        times.append(time.perf_counter())
spec = ll.TrainSpec(steps=steps, batch_size=4, lr=1e-3, warmup_steps=2, seed=0, gradient_checkpointing=True,
                    chunked_loss=True, loss_chunk_size=64, output_dir=out, compile=compile_)
t0 = time.perf_counter()
res = ll.train(model, tok, data, spec=spec, callbacks=[Clock()])
print("__RESULT__" + json.dumps({
    "wall_s": times[-1] - t0, "first_step_s": times[0] - t0,
    "step_s": (times[-1] - times[4]) / (len(times) - 5), "graphs": counters["stats"]["unique_graphs"],
    "peak_tree_mib": peak[0], "loss": res.final["loss"], "precision": res.final["precision"]}))
"""

KEYS = ("wall_s", "first_step_s", "step_s", "peak_tree_mib", "graphs")


def run(model: str, compile_: bool, steps: int, cache: str) -> dict:
    with tempfile.TemporaryDirectory() as out:
        return run_child(CHILD, model, "1" if compile_ else "0", str(steps), out,
                         TORCHINDUCTOR_CACHE_DIR=cache)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="builtin:smollm2")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="builtin:tiny, 12 steps, 1 repeat")
    args = ap.parse_args()
    if args.quick:
        args.model, args.steps, args.repeats = "builtin:tiny", 12, 1
    sides: dict[str, list[dict]] = {"eager": [], "cold": [], "warm": []}
    with tempfile.TemporaryDirectory() as root:
        for i in range(args.repeats):
            cache = os.path.join(root, f"inductor-{i}")  # empty: the cold run fills it, the warm run reads it
            for name, compile_ in (("eager", False), ("cold", True), ("warm", True)):
                r = run(args.model, compile_, args.steps, cache)
                sides[name].append(r)
                print(f"repeat {i + 1} {name:>5}: {r['wall_s']:6.1f} s in all, first step "
                      f"{r['first_step_s']:5.1f} s, then {r['step_s']:.3f} s/step, {r['graphs']} graphs, "
                      f"peak {r['peak_tree_mib']:5.0f} MiB (tree), loss {r['loss']:.4f}, {r['precision']}",
                      flush=True)
    med = {name: {k: statistics.median(r[k] for r in rs) for k in KEYS} for name, rs in sides.items()}
    print("\n| side | wall (s) | first step (s) | step after 5 (s) | graphs | peak RSS, tree (MiB) |\n"
          "|---|---|---|---|---|---|")
    for name, m in med.items():
        print(f"| {name} | {m['wall_s']:.1f} | {m['first_step_s']:.1f} | {m['step_s']:.3f} | "
              f"{m['graphs']:.0f} | {m['peak_tree_mib']:,.0f} |")
    e, c, w = med["eager"], med["cold"], med["warm"]
    ratios = {"step_speedup_warm_vs_eager": e["step_s"] / w["step_s"],
              "wall_warm_vs_eager": w["wall_s"] / e["wall_s"],
              "wall_cold_vs_eager": c["wall_s"] / e["wall_s"],
              "peak_tree_cold_vs_eager": c["peak_tree_mib"] / e["peak_tree_mib"],
              "peak_tree_warm_vs_eager": w["peak_tree_mib"] / e["peak_tree_mib"]}
    report("compile", ratios, {"step_speedup_warm_vs_eager": ">= 1.2", "wall_warm_vs_eager": "< 1.0"},
           quick=args.quick, extra={"model": args.model, "steps": args.steps, "repeats": args.repeats,
                                    "medians": med})


if __name__ == "__main__":
    main()
