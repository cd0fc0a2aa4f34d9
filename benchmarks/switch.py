"""Benchmark: switching adapters (set_adapter) against reloading them, and loading as the count grows.

Run:  nice python benchmarks/switch.py [--quick] [--layers N] [--dtype bf16|fp32] [--no-1b]

Two base models, each with adapters saved to a temporary folder first (LoRA on all linear layers,
random non-zero B, one rank):

* ``builtin``: ``builtin:tiny`` when present, else ``builtin:tiny-random`` (fp32, r = 8);
* ``1B``: a Llama built from a TinyLlama-1.1B-shaped config (hidden 2048, MLP 5632, 32 query /
  4 key-value heads, vocab 32000, 22 layers) with random weights on CPU (bf16 by default, r = 16).
  ``--layers N`` keeps the shape of every layer but builds only N of them (less memory and time;
  the switch cost scales with the number of LoRA modules, so it is reported per module too).

For each model:

1. **switch**: 8 adapters loaded; the median of 100 switches cycling through them, three ways:
   ``lora_lab.hf.adapters.switch.switch_adapter`` (what the switchboard and ``generate`` use: re-routes the
   cached adapter layers), ``lora_lab.set_adapter`` and peft's ``model.set_adapter`` (both also
   re-flag ``requires_grad`` on every adapter's parameters, so they grow with the adapter count);
2. **reload**: the median time to load one adapter from disk onto the model (``lora_lab.load_adapter``,
   which also checks every tensor's shape, and peft's bare ``model.load_adapter``), i.e. what a
   switch costs when it is done by reloading;
3. **growth**: the time to load the k-th adapter, k = 1 … 32 (best of ``--repeats`` sequences on
   the builtin model, one on the 1B model).  Load 1 wraps the base in a PeftModel; loads 2 … 32 add
   to it.

Targets (issue 8): switch < 5 ms on the builtin model; switch ≥ 100× faster than a reload; the 32nd
load ≤ 1.5× the first.  Ratios are against baselines measured in this same run.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

import lora_lab as ll
from lora_lab.hf.adapters.switch import switch_adapter

N_SWITCH_ADAPTERS, N_SWITCHES, N_GROWTH = 8, 100, 32
ONE_B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
             num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)


def builtin_model():
    name = "builtin:tiny" if "builtin:tiny" in ll.builtin_names() else "builtin:tiny-random"
    model, _ = ll.load_model(name, device="cpu")
    return name, model


def one_b_model(layers: int, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**ONE_B, "num_hidden_layers": layers})
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(dtype)
    with torch.no_grad():                      # random weights, cheaper than the full init scheme
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.eval()


def save_adapters(make_base, n: int, r: int, root: Path) -> list[Path]:
    """Save ``n`` adapters (random B, one seed each) trained-looking enough for switching."""
    base = make_base()
    folders = []
    pm = None
    for i in range(n):
        pm = ll.attach(base if pm is None else pm, ll.AdapterSpec(r=r, alpha=2 * r), name=f"ad{i}")
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if f".ad{i}." in name and "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.01)
        folders.append(ll.save_adapter(pm, root / f"ad{i}", adapter=f"ad{i}"))
    del base, pm
    gc.collect()
    return folders


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


SWITCHES = {
    "switch_adapter": lambda model, name: switch_adapter(model, name),
    "lora_lab.set_adapter": lambda model, name: ll.set_adapter(model, name),
    "peft set_adapter": lambda model, name: model.set_adapter(name),
}


def switch_times(model, names: list[str], n: int) -> dict[str, list[float]]:
    """``n`` timed switches per method, interleaved so that load spikes hit all methods alike."""
    out: dict[str, list[float]] = {how: [] for how in SWITCHES}
    for k in range(n + 5):                                  # 5 warm-up rounds
        for i, (how, fn) in enumerate(SWITCHES.items()):
            name = names[(k * len(SWITCHES) + i) % len(names)]   # always a different adapter
            t = timed(lambda: fn(model, name))
            if k >= 5:
                out[how].append(t)
    return out


def _load_bare(model, folder: Path, name: str):
    """peft alone: wrap the base on the first load, add to the PeftModel afterwards."""
    import peft

    if not isinstance(model, peft.PeftModel):
        return peft.PeftModel.from_pretrained(model, str(folder), adapter_name=name)
    model.load_adapter(str(folder), adapter_name=name)
    return model


def growth(make_base, folders: list[Path], n: int, bare: bool = False) -> list[float]:
    load = _load_bare if bare else (lambda m, f, name: ll.load_adapter(m, f, name=name))
    model, times = make_base(), []
    for k in range(n):
        folder = folders[k % len(folders)]
        box = {}
        times.append(timed(lambda: box.setdefault("m", load(model, folder, f"g{k}"))))
        model = box["m"]
    model = None
    gc.collect()
    return times


def reload_times(model, folder: Path, reps: int, bare: bool) -> list[float]:
    out = []
    for k in range(reps):
        name = f"re{k}"
        if bare:
            out.append(timed(lambda: model.load_adapter(str(folder), adapter_name=name)))
        else:
            out.append(timed(lambda: ll.load_adapter(model, folder, name=name)))
        ll.set_adapter(model, "ad0")
        model.delete_adapter(name)
    return out


def bench(label: str, make_base, r: int, repeats: int, reload_reps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folders = save_adapters(make_base, N_SWITCH_ADAPTERS, r, Path(tmp))
        model = make_base()
        for i, f in enumerate(folders):
            model = ll.load_adapter(model, f, name=f"ad{i}")
        modules = sum(1 for _ in ll.lora_factors(model, "ad0"))
        names = [f"ad{i}" for i in range(N_SWITCH_ADAPTERS)]
        sw = {how: statistics.median(ts) for how, ts in
              switch_times(model, names, N_SWITCHES).items()}
        rl = statistics.median(reload_times(model, folders[1], reload_reps, bare=False))
        rl_bare = statistics.median(reload_times(model, folders[1], reload_reps, bare=True))
        del model
        gc.collect()
        runs = [growth(make_base, folders, N_GROWTH) for _ in range(repeats)]
        bare = [growth(make_base, folders, N_GROWTH, bare=True) for _ in range(repeats)]
    grow = [min(ts) for ts in zip(*runs)]
    grow_bare = [min(ts) for ts in zip(*bare)]
    return dict(label=label, modules=modules, switch=sw, reload=rl,
                reload_bare=rl_bare, grow=grow, grow_bare=grow_bare)


def report(res: dict) -> list[str]:
    g, fails = res["grow"], []
    print(f"\n== {res['label']}: {res['modules']} LoRA modules per adapter")
    for how, t in res["switch"].items():
        print(f"switch ({how}, median of {N_SWITCHES}):{' ' * (21 - len(how))}{t * 1e3:9.3f} ms "
              f"({t * 1e6 / res['modules']:.2f} µs per LoRA module)")
    print(f"reload from disk (lora_lab.load_adapter, checked): {res['reload'] * 1e3:8.1f} ms")
    print(f"reload from disk (peft model.load_adapter, bare):  {res['reload_bare'] * 1e3:8.1f} ms")
    fast, full = res["switch"]["switch_adapter"], res["switch"]["lora_lab.set_adapter"]
    speedup = res["reload_bare"] / fast
    print(f"switch_adapter vs bare reload: {speedup:,.0f}× faster (target >= 100×); vs checked "
          f"reload: {res['reload'] / fast:,.0f}×; lora_lab.set_adapter vs bare reload: "
          f"{res['reload_bare'] / full:,.0f}×")
    marks = [1, 2, 4, 8, 16, 24, 32]
    for what, ts in (("lora_lab.load_adapter", g), ("peft alone", res["grow_bare"])):
        print(f"load k-th adapter, {what} (ms): "
              + "  ".join(f"k={k}: {ts[k - 1] * 1e3:.0f}" for k in marks))
        print(f"   32nd / 1st: {ts[-1] / ts[0]:.2f}× (target <= 1.5×); 32nd / 2nd (both add to a "
              f"PeftModel): {ts[-1] / ts[1]:.2f}×; median of loads 25-32 / 2-8: "
              f"{statistics.median(ts[24:]) / statistics.median(ts[1:8]):.2f}×")
    ratio = g[-1] / g[0]
    if speedup < 100:
        fails.append(f"{res['label']}: switch only {speedup:.0f}× faster than a reload")
    if ratio > 1.5:
        fails.append(f"{res['label']}: 32nd load {ratio:.2f}× the first")
    return fails


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="builtin model only, one growth sequence")
    ap.add_argument("--no-1b", action="store_true", help="skip the 1B-shaped model")
    ap.add_argument("--layers", type=int, default=22, help="decoder layers of the 1B model (22)")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--repeats", type=int, default=3, help="growth sequences on the builtin model")
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.1f}")
    name, _ = builtin_model()
    res = bench(name, lambda: builtin_model()[1], r=8, repeats=1 if args.quick else args.repeats,
                reload_reps=5 if args.quick else 15)
    fails = report(res)
    if res["switch"]["switch_adapter"] >= 5e-3:
        fails.append(f"{name}: switch {res['switch']['switch_adapter'] * 1e3:.2f} ms (target < 5 ms)")
    if not (args.quick or args.no_1b):
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        t0 = time.perf_counter()
        one_b_model(args.layers, dtype)
        build_s = time.perf_counter() - t0
        label = (f"1B-shaped Llama ({args.layers} of 22 layers, {args.dtype}, random weights; "
                 f"built in {build_s:.1f} s)")
        fails += report(bench(label, lambda: one_b_model(args.layers, dtype), r=16, repeats=1,
                              reload_reps=5))
    print("\n" + ("all targets met" if not fails else "MISSED: " + "; ".join(fails)))


if __name__ == "__main__":
    main()
