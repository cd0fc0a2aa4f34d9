"""Benchmark: the RankExplorer's server-side work for one slider move on a 7B-shaped adapter.

Run:  nice python benchmarks/rank_explorer.py [--moves 60] [--quick]   (--quick: 12 moves)

The adapter: Llama-7B shapes (32 layers × q, k, v, o, gate, up, down = 224 modules), r = 16, random
factors, as :class:`lora_lab.hf.adapters.factors.LoraFactors`; the spectra come from
``spectra_from_factors`` (the code path of ``adapter_spectra``), so no 7B model is needed.

* ``explorer``: set ``RankExplorer.slider.value`` to k (cycling 1..16, never the same value twice
  in a row) and time the whole Python-side update: traits, summary, heatmap z/text, the cut line
  and title of the module figure (FigureWidget when anywidget is installed, else the static figure).
* ``baseline``: what a naive explorer would redo per move: ``spectrum_heatmap(spectra,
  "energy_at_k", k)`` (table + pivot) plus ``energy_at``/``error_at``/``parameters_at``.

Target (issue 5): explorer median < 50 ms per move.  Both are measured in this run, on this machine,
with the same protocol: three untimed warm-up moves, then the same ``--moves`` slider values, the
median reported (other processes on a shared machine only add time).  The last line of the output
is the JSON line of ``benchmarks/_report.py``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import _report
import torch

from lora_lab.hf.adapters.factors import LoraFactors
from lora_lab.hf.spectra.analysis import spectra_from_factors
from lora_lab.ui.rank_explorer import RankExplorer
from lora_lab.viz.spectrum import spectrum_heatmap

LLAMA_7B = {"self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (4096, 4096),
            "self_attn.v_proj": (4096, 4096), "self_attn.o_proj": (4096, 4096),
            "mlp.gate_proj": (11008, 4096), "mlp.up_proj": (11008, 4096),
            "mlp.down_proj": (4096, 11008)}   # (out, in) of ΔW


def factors(layers: int = 32, r: int = 16, seed: int = 0) -> list[LoraFactors]:
    gen = torch.Generator().manual_seed(seed)
    return [LoraFactors(f"model.layers.{i}.{kind}", A=torch.randn(r, n, generator=gen) * 0.01,
                        B=torch.randn(m, r, generator=gen) * 0.01, scaling=2.0)
            for i in range(layers) for kind, (m, n) in LLAMA_7B.items()]


def timed(fn, ks) -> list[float]:
    out = []
    for k in ks:
        t0 = time.perf_counter()
        fn(k)
        out.append(time.perf_counter() - t0)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--moves", type=int, default=60, help="timed slider moves per case (60)")
    parser.add_argument("--quick", action="store_true", help="12 moves")
    args = parser.parse_args(argv)
    if args.quick:
        args.moves = 12
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    fs = factors()
    t0 = time.perf_counter()
    spectra = spectra_from_factors(fs, "llama-7b-shaped")
    print(f"spectra_from_factors: {len(spectra)} modules, r=16 in {time.perf_counter() - t0:.2f} s "
          "(once, at construction)")
    t0 = time.perf_counter()
    explorer = RankExplorer(spectra, rank=8)
    print(f"RankExplorer built in {time.perf_counter() - t0:.2f} s, figures: "
          f"{'static go.Figure' if explorer.live.static else 'FigureWidget'}")
    ks = [1 + (i * 5) % 16 for i in range(args.moves)]     # 1, 6, 11, 16, 5, ...: always a change
    ks = [k if k != 8 else 9 for k in ks]

    def move(k):
        explorer.slider.value = k

    def baseline(k):
        spectrum_heatmap(spectra, "energy_at_k", k=k)
        spectra.energy_at(k), spectra.error_at(k), spectra.parameters_at(k)

    timed(move, ks[:3])                                     # warm-up
    results = {}
    for metric in ("energy_at_k", "error_at_k", "effective_rank"):
        explorer.metric.value = metric
        results[metric] = timed(move, ks)
    timed(baseline, ks[:3])                                 # warm-up, as for the explorer
    base = timed(baseline, ks)
    b = statistics.median(base) * 1e3
    print(f"\n{'case':<34} {'median ms':>10} {'p90 ms':>8} {'× faster than baseline':>24}")
    for metric, times in results.items():
        ms = sorted(t * 1e3 for t in times)
        med, p90 = statistics.median(ms), ms[int(0.9 * (len(ms) - 1))]
        print(f"{'slider move, heatmap ' + metric:<34} {med:>10.2f} {p90:>8.2f} {b / med:>24.1f}")
    print(f"{'baseline (table + pivot per move)':<34} {b:>10.2f}")
    worst = max(statistics.median(t) for t in results.values()) * 1e3
    print(f"\nmedian slider move {worst:.2f} ms (worst metric) vs target 50 ms: "
          f"{'OK' if worst < 50 else 'TOO SLOW'}; {explorer.updates} updates done")
    _report.report("rank_explorer", {"worst_move_ms": worst, "baseline/worst_move": b / worst},
                   {"worst_move_ms": "< 50"}, quick=args.quick,
                   extra={"moves": args.moves, "baseline_ms": b,
                          "move_median_ms": {m: statistics.median(t) * 1e3 for m, t in results.items()},
                          "figures": "static" if explorer.live.static else "FigureWidget"})


if __name__ == "__main__":
    main()
