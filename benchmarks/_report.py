"""The closing JSON line every benchmark prints: what was measured, against what target, where, with what.

Benchmarks run as scripts (``python benchmarks/x.py``), so Python puts ``benchmarks/`` on ``sys.path``
and a script imports this module as a plain top-level module::

    from _report import report

    report("switch", {"switch_vs_reload": 41.3}, {"switch_vs_reload": ">= 10"})

prints one line (and returns it as a dict), the last line of the benchmark's output, so that
``python benchmarks/x.py --quick | tail -n 1`` is machine-readable::

    {"benchmark": "switch", "ratios": {"switch_vs_reload": 41.3},
     "targets": {"switch_vs_reload": ">= 10"}, "met": true, "per_ratio_met": {"switch_vs_reload": true},
     "quick": false, "machine": {"cpu": "...", "cores": 2, "torch_threads": 2, "gpu": null,
     "load_avg_1m": 5.1}, "versions": {"python": "3.12.3", "torch": "2.13.0+cpu", ...}, "extra": {}}

Targets are strings ``"<op> <number>"`` with ``op`` one of ``>=``, ``>``, ``<=``, ``<``; a ratio
meets its target when ``ratio op number`` holds.  ``met`` is true when every target is met, false
when one is not, and null when there is no target (an informative benchmark) or a ratio is missing.
``load_avg_1m`` is recorded because timings on a shared machine move with its load: compare only
ratios measured in the same run.
"""

from __future__ import annotations

import importlib.metadata
import json
import operator
import os
import platform
import sys

__all__ = ["report", "machine", "versions", "check"]

_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
_PACKAGES = {"torch": "torch", "transformers": "transformers", "peft": "peft",
             "bitsandbytes": "bitsandbytes", "lora_lab": "lora-lab"}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """CPU model, logical cores available to this process, torch's intra-op threads, the GPU (or None),
    and the 1-minute load average (None where the OS has none)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count()
    threads = gpu = None
    if "torch" in sys.modules:  # don't pay torch's import in a benchmark that never used it
        import torch

        threads = torch.get_num_threads()
        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    try:
        load = round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        load = None
    return {"cpu": _cpu_model(), "cores": cores, "torch_threads": threads, "gpu": gpu, "load_avg_1m": load}


def versions() -> dict:
    """Python and the installed distributions' versions (None when not installed); nothing is imported."""
    out = {"python": platform.python_version()}
    for key, dist in _PACKAGES.items():
        try:
            out[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[key] = None
    if "torch" in sys.modules:  # the running build, e.g. "2.13.0+cpu", is more telling than metadata
        out["torch"] = sys.modules["torch"].__version__
    return out


def check(value: float | None, target: str) -> bool | None:
    """``check(1.02, ">= 0.97") -> True``; None when ``value`` is None.  Raises ValueError on a bad
    target string (a benchmark bug, not user input)."""
    op, _, number = target.strip().partition(" ")
    if op not in _OPS:
        raise ValueError(f"target {target!r}: expected '<op> <number>' with op in {sorted(_OPS)}")
    return None if value is None else bool(_OPS[op](float(value), float(number)))


def report(name: str, ratios: dict, targets: dict | None = None, *, quick: bool = False,
           extra: dict | None = None, file=None) -> dict:
    """Print the benchmark's closing JSON line and return it as a dict.

    name:    the benchmark (the script's stem, e.g. ``"switch"``).
    ratios:  ``{key: float}``, the headline measurements (ratios of times or bytes measured in the
             same run, with the same protocol on both sides).
    targets: ``{key: "<op> <number>"}`` for the ratios that have one (issue numbers in the
             benchmark's docstring say where each target comes from).
    quick:   whether this was the quick variant (smaller sizes: numbers less stable).
    extra:   anything else worth keeping (absolute times, sizes, settings); must be JSON-serialisable.
    """
    targets = dict(targets or {})
    per = {k: check(ratios.get(k), t) for k, t in targets.items()}
    met = None if not per or None in per.values() else all(per.values())
    line = {"benchmark": name,
            "ratios": {k: (None if v is None else float(f"{float(v):.4g}")) for k, v in ratios.items()},
            "targets": targets, "met": met, "per_ratio_met": per, "quick": bool(quick),
            "machine": machine(), "versions": versions(), "extra": dict(extra or {})}
    out = file or sys.stdout
    out.flush()
    print(json.dumps(line, default=str), file=out, flush=True)
    return line
