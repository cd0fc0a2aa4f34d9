"""Benchmark: switching adapters (set_adapter) against peft's and against reloading them, and
loading as the count grows.

Run:  nice python benchmarks/switch.py [--model builtin:tiny|builtin:smollm2|FOLDER] [--switch-only]
                                       [--threads 1] [--quick] [--layers N] [--dtype bf16|fp32] [--no-1b]

Two base models, each with adapters saved to a temporary folder first (LoRA on all linear layers,
random non-zero B, one rank):

* ``--model`` (default ``builtin:tiny``, else ``builtin:tiny-random`` when it is absent; or
  ``builtin:smollm2``, or a model folder such as a saved SmolLM2-135M-Instruct: 30 layers, 210
  LoRA modules), fp32, r = 8;
* ``1B``: a Llama built from a TinyLlama-1.1B-shaped config (hidden 2048, MLP 5632, 32 query /
  4 key-value heads, vocab 32000, 22 layers) with random weights on CPU (bf16 by default, r = 16).
  ``--layers N`` keeps the shape of every layer but builds only N of them (less memory and time;
  the switch cost scales with the number of LoRA modules, so it is reported per module too).

For each model:

1. **switch**: ``--adapters`` (8) adapters loaded; the median of 100 switches cycling through them
   (after 5 warm-up rounds, all methods interleaved, torch on ``--threads`` threads), three ways:
   ``lora_lab.set_adapter`` and ``lora_lab.switch_adapter`` (one function under two names: it
   re-routes the cached adapter layers and re-flags ``requires_grad``) against peft's own
   ``model.set_adapter`` (which walks the whole module tree).  Then switching everything off, the
   same way: ``lora_lab.set_adapter(model, None)`` against peft's
   ``model.base_model.disable_adapter_layers()``.  Each is printed with its ratio to peft's;
2. **reload**: the median time to load one adapter from disk onto the model (``lora_lab.load_adapter``,
   which also checks every tensor's shape, and peft's bare ``model.load_adapter``), i.e. what a
   switch costs when it is done by reloading;
3. **growth**: the time to load the k-th adapter, k = 1 … 32 (best of ``--repeats`` sequences on
   the builtin model, one on the 1B model).  Load 1 wraps the base in a PeftModel; loads 2 … 32 add
   to it.

Targets: (issue 16) ``lora_lab.set_adapter`` ≤ 1 ms median where an adapter has ≤ 210 LoRA modules;
(issue 8) switch ≥ 100× faster than a reload, checked against the *faster* of the two reloads
(lora_lab's own ``load_adapter`` is usually the faster one, so the headline is against it, with the
ratio against peft's bare reload beside it); the 32nd load ≤ 1.5× the first.  Ratios are against
baselines measured in this same run.  The last line of the output is the JSON line of
``benchmarks/_report.py`` (for ``--model``; the 1B model's numbers are in its ``extra``).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
from pathlib import Path

import _report
import torch

import lora_lab as ll

N_SWITCHES, N_WARMUP, N_GROWTH = 100, 5, 32
SWITCH_TARGET_S, SWITCH_TARGET_MODULES = 1e-3, 210
ONE_B = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
         "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 2048}


def model_name(requested: str) -> str:
    """``requested``, except that ``builtin:tiny`` falls back to ``builtin:tiny-random``."""
    if requested == "builtin:tiny" and requested not in ll.builtin_names():
        return "builtin:tiny-random"
    return requested


def load_base(name: str):
    model, _ = ll.load_model(name, device="cpu", dtype=torch.float32)
    return model.eval()


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


def timed(fn, *args, **kwargs):
    """``(seconds, result)`` of ``fn(*args, **kwargs)``."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


PEFT, PEFT_OFF = "peft set_adapter", "peft disable_adapter_layers"
FULL_PASS = "lora_lab.set_adapter, right after peft's"
SWITCHES = {     # name -> (switch to adapter `name`, or off when name is None)
    PEFT: lambda model, name: model.set_adapter(name),
    "lora_lab.set_adapter": lambda model, name: ll.set_adapter(model, name),
    "lora_lab.switch_adapter": lambda model, name: ll.switch_adapter(model, name),
}
OFF = {          # switching every adapter off: (timed, untimed way back on)
    PEFT_OFF: (lambda model: model.base_model.disable_adapter_layers(),
               lambda model, name: (model.base_model.enable_adapter_layers(), model.set_adapter(name))),
    "lora_lab.set_adapter(None)": (lambda model: ll.set_adapter(model, None),
                                   lambda model, name: ll.set_adapter(model, name)),
}


def switch_times(model, names: list[str], n: int, forward: bool) -> dict[str, list[float]]:
    """``n`` timed switches per method, in blocks of ``n // 10`` consecutive switches per method
    and round, methods taking turns so that load spikes hit all alike; round 0 and the first
    switch of every block are warm-up (the first one undoes the other method's state: after peft's
    own set_adapter lora_lab re-flags every adapter parameter, recorded as FULL_PASS).  With
    ``forward``, an untimed forward pass on 8 tokens comes before every switch, as a generation
    does between two switches in use (it also leaves the CPU caches as they are in use).
    Then the same for switching everything off."""
    ids = torch.arange(3, 11).unsqueeze(0)
    block, rounds = max(1, n // 10), 10
    out: dict[str, list[float]] = {how: [] for how in [*SWITCHES, FULL_PASS, *OFF]}
    k = 0

    def step(fn, *args) -> float:
        if forward:
            with torch.no_grad():
                model(input_ids=ids)
        return timed(fn, *args)[0]

    for r in range(rounds + 1):
        for how, fn in SWITCHES.items():
            for j in range(block + 1):
                k += 1
                t = step(fn, model, names[k % len(names)])   # always a different adapter
                if r and j:
                    out[how].append(t)
                elif r and how == "lora_lab.set_adapter":
                    out[FULL_PASS].append(t)
    for r in range(rounds + 1):
        for how, (off, back) in OFF.items():
            for j in range(block + 1):
                k += 1
                back(model, names[k % len(names)])
                t = step(off, model)
                if r and j:
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
        t, model = timed(load, model, folder, f"g{k}")
        times.append(t)
    model = None
    gc.collect()
    return times


def reload_times(model, folder: Path, reps: int, bare: bool) -> list[float]:
    out = []
    for k in range(reps):
        name = f"re{k}"
        if bare:
            out.append(timed(model.load_adapter, str(folder), adapter_name=name)[0])
        else:
            out.append(timed(ll.load_adapter, model, folder, name=name)[0])
        ll.set_adapter(model, "ad0")
        model.delete_adapter(name)
    return out


def bench(label: str, make_base, r: int, repeats: int, reload_reps: int, n_adapters: int,
          switch_only: bool = False, forward: bool = True) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folders = save_adapters(make_base, n_adapters, r, Path(tmp))
        model = make_base()
        for i, f in enumerate(folders):
            model = ll.load_adapter(model, f, name=f"ad{i}")
        modules = sum(1 for _ in ll.lora_factors(model, "ad0"))
        names = [f"ad{i}" for i in range(n_adapters)]
        model.eval()
        sw = {how: statistics.median(ts) for how, ts in
              switch_times(model, names, N_SWITCHES, forward).items()}
        res = {"label": label, "modules": modules, "adapters": n_adapters, "switch": sw,
               "forward": forward}
        if switch_only:
            return res
        rl = statistics.median(reload_times(model, folders[1], reload_reps, bare=False))
        rl_bare = statistics.median(reload_times(model, folders[1], reload_reps, bare=True))
        del model
        gc.collect()
        runs = [growth(make_base, folders, N_GROWTH) for _ in range(repeats)]
        bare = [growth(make_base, folders, N_GROWTH, bare=True) for _ in range(repeats)]
    grow = [min(ts) for ts in zip(*runs)]
    grow_bare = [min(ts) for ts in zip(*bare)]
    return dict(res, reload=rl, reload_bare=rl_bare, grow=grow, grow_bare=grow_bare)


def report_switch(res: dict) -> list[str]:
    fails = []
    print(f"\n== {res['label']}: {res['modules']} LoRA modules per adapter, {res['adapters']} adapters")
    sw = res["switch"]
    print(f"median switch times ({N_SWITCHES} each; {FULL_PASS!r}: the first switch of each of its "
          f"blocks; {'a forward pass before each' if res['forward'] else 'back to back'})")
    for how, t in sw.items():
        base = sw[PEFT_OFF] if how in OFF else sw[PEFT]
        ratio = "" if how in (PEFT, PEFT_OFF) else f"  {base / t:7.1f}× faster than peft's"
        print(f"{how + ':':39s}{t * 1e3:9.3f} ms ({t * 1e6 / res['modules']:6.2f} µs per LoRA "
              f"module){ratio}")
    if res["modules"] <= SWITCH_TARGET_MODULES:
        for how in ("lora_lab.set_adapter", "lora_lab.switch_adapter",
                    "lora_lab.set_adapter(None)"):
            if sw[how] > SWITCH_TARGET_S:
                fails.append(f"{res['label']}: {how} {sw[how] * 1e3:.2f} ms (target <= 1 ms)")
    return fails


def report(res: dict) -> list[str]:
    fails = report_switch(res)
    if "grow" not in res:
        return fails
    g = res["grow"]
    print(f"reload from disk (lora_lab.load_adapter, checked): {res['reload'] * 1e3:8.1f} ms")
    print(f"reload from disk (peft model.load_adapter, bare):  {res['reload_bare'] * 1e3:8.1f} ms")
    fast, peft = res["switch"]["lora_lab.set_adapter"], res["switch"][PEFT]
    own, bare = res["reload"] / fast, res["reload_bare"] / fast
    speedup = min(own, bare)                       # against the faster reload: the fair baseline
    print(f"lora_lab.set_adapter vs lora_lab's own reload (load_adapter): {own:,.0f}× faster; vs "
          f"peft's bare reload: {bare:,.0f}×; target >= 100× against the faster reload: {speedup:,.0f}×"
          f"; peft set_adapter vs peft's bare reload: {res['reload_bare'] / peft:,.0f}×")
    res["speedup_vs_own_reload"], res["speedup_vs_peft_reload"] = own, bare
    marks = [1, 2, 4, 8, 16, 24, 32]
    for what, ts in (("lora_lab.load_adapter", g), ("peft alone", res["grow_bare"])):
        print(f"load k-th adapter, {what} (ms): "
              + "  ".join(f"k={k}: {ts[k - 1] * 1e3:.0f}" for k in marks))
        print(f"   32nd / 1st: {ts[-1] / ts[0]:.2f}× (target <= 1.5×); 32nd / 2nd (both add to a "
              f"PeftModel): {ts[-1] / ts[1]:.2f}×; median of loads 25-32 / 2-8: "
              f"{statistics.median(ts[24:]) / statistics.median(ts[1:8]):.2f}×")
    ratio = g[-1] / g[0]
    gb = res["grow_bare"]
    res["growth_32_over_1"], res["growth_32_over_1_peft"] = ratio, gb[-1] / gb[0]
    res["growth_32_over_2"], res["growth_32_over_2_peft"] = g[-1] / g[1], gb[-1] / gb[1]
    if speedup < 100:
        fails.append(f"{res['label']}: switch only {speedup:.0f}× faster than a reload")
    if ratio > 1.5:
        fails.append(f"{res['label']}: 32nd load {ratio:.2f}× the first")
    return fails


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:tiny",
                    help="builtin:tiny (default), builtin:smollm2, or a model folder")
    ap.add_argument("--adapters", type=int, default=8, help="adapters loaded for the switch (8)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1)")
    ap.add_argument("--no-forward", action="store_true",
                    help="switch back to back, without a forward pass before each switch")
    ap.add_argument("--switch-only", action="store_true",
                    help="--model's switch times only: no reload, no growth, no 1B model")
    ap.add_argument("--quick", action="store_true", help="--model only, one growth sequence")
    ap.add_argument("--no-1b", action="store_true", help="skip the 1B-shaped model")
    ap.add_argument("--layers", type=int, default=22, help="decoder layers of the 1B model (22)")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--repeats", type=int, default=3, help="growth sequences on the builtin model")
    args = ap.parse_args(argv)
    if args.adapters < 2:
        ap.error("--adapters must be at least 2 (a switch goes from one adapter to another)")
    torch.set_num_threads(args.threads)
    import peft

    print(f"torch {torch.__version__}, peft {peft.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}")
    name = model_name(args.model)
    res = bench(name, lambda: load_base(name), r=8, repeats=1 if args.quick else args.repeats,
                reload_reps=5 if args.quick else 15, n_adapters=args.adapters,
                switch_only=args.switch_only, forward=not args.no_forward)
    fails = report(res)
    one_b = None
    if not (args.quick or args.no_1b or args.switch_only):
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        t0 = time.perf_counter()
        one_b_model(args.layers, dtype)
        build_s = time.perf_counter() - t0
        label = (f"1B-shaped Llama ({args.layers} of 22 layers, {args.dtype}, random weights; "
                 f"built in {build_s:.1f} s)")
        one_b = bench(label, lambda: one_b_model(args.layers, dtype), r=16, repeats=1,
                      reload_reps=5, n_adapters=args.adapters, forward=not args.no_forward)
        fails += report(one_b)
    print("\n" + ("all targets met" if not fails else "MISSED: " + "; ".join(fails)))
    sw = res["switch"]
    ratios = {"set_adapter_ms": sw["lora_lab.set_adapter"] * 1e3,
              "peft_set_adapter/set_adapter": sw[PEFT] / sw["lora_lab.set_adapter"],
              "peft_disable/set_adapter(None)": sw[PEFT_OFF] / sw["lora_lab.set_adapter(None)"]}
    targets = {"set_adapter_ms": "<= 1"} if res["modules"] <= SWITCH_TARGET_MODULES else {}
    if "reload" in res:
        ratios.update({"own_reload/switch": res["speedup_vs_own_reload"],
                       "peft_reload/switch": res["speedup_vs_peft_reload"],
                       "load_32nd/load_1st": res["growth_32_over_1"],
                       "load_32nd/load_1st (peft alone)": res["growth_32_over_1_peft"],
                       "load_32nd/load_2nd": res["growth_32_over_2"],
                       "load_32nd/load_2nd (peft alone)": res["growth_32_over_2_peft"]})
        targets.update({"own_reload/switch": ">= 100", "load_32nd/load_1st": "<= 1.5"})
    keep = ("modules", "adapters", "reload", "reload_bare", "growth_32_over_1", "growth_32_over_1_peft",
            "growth_32_over_2", "growth_32_over_2_peft")
    _report.report("switch", ratios, targets, quick=args.quick,
                   extra={"model": name, "modules": res["modules"], "adapters": res["adapters"],
                          "threads": args.threads, "switch_ms": {k: v * 1e3 for k, v in sw.items()},
                          "one_b": None if one_b is None else
                          {"label": one_b["label"], **{k: one_b.get(k) for k in keep}}})


if __name__ == "__main__":
    main()
