"""The benchmarks' closing JSON line (benchmarks/_report.py) and the quick variant ``make bench`` runs.

Nothing heavy runs here: the helper is called directly, and each benchmark script is checked by
reading its source (``ast``) for a ``--quick`` option and a call of ``_report.report``, so that
``make bench`` (which runs ``python benchmarks/X.py --quick`` for every X in the Makefile's
BENCHMARKS) covers every script and ends each with one JSON line.
"""

from __future__ import annotations

import ast
import importlib.util
import io
import json
import os
import platform
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if not p.name.startswith("_"))


@pytest.fixture(scope="module")
def rep():
    spec = importlib.util.spec_from_file_location("_report", BENCH / "_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _line(rep, *args, **kwargs) -> tuple[dict, str]:
    buf = io.StringIO()
    returned = rep.report(*args, file=buf, **kwargs)
    text = buf.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n"), "exactly one line"
    parsed = json.loads(text)
    assert parsed == json.loads(json.dumps(returned)), "the printed line is the returned dict"
    return parsed, text


def test_report_prints_one_json_line_with_every_field(rep):
    import peft
    import torch
    import transformers

    line, _ = _line(rep, "demo", {"a/b": 1.02, "c": 120.0}, {"a/b": ">= 0.97", "c": "< 100"},
                    quick=True, extra={"steps": 12})
    assert set(line) >= {"benchmark", "ratios", "targets", "met", "per_ratio_met", "quick", "machine",
                         "versions", "extra"}
    assert line["benchmark"] == "demo" and line["quick"] is True and line["extra"] == {"steps": 12}
    assert line["ratios"] == {"a/b": 1.02, "c": 120.0}
    assert line["per_ratio_met"] == {"a/b": True, "c": False} and line["met"] is False
    m = line["machine"]
    assert m["cores"] == len(os.sched_getaffinity(0))
    assert m["torch_threads"] == torch.get_num_threads()          # torch is imported here
    assert m["gpu"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    assert isinstance(m["cpu"], str) and m["cpu"]
    v = line["versions"]
    assert v["python"] == platform.python_version()
    assert (v["torch"], v["transformers"], v["peft"]) == (torch.__version__, transformers.__version__,
                                                          peft.__version__)
    assert set(v) == {"python", "torch", "transformers", "peft", "bitsandbytes", "lora_lab"}
    assert v["lora_lab"] and v["bitsandbytes"]


def test_targets_met_and_missing(rep):
    ok, _ = _line(rep, "x", {"r": 0.97}, {"r": ">= 0.97"})
    assert ok["met"] is True
    none, _ = _line(rep, "x", {"r": 2.0})                         # no target: informative
    assert none["met"] is None and none["per_ratio_met"] == {}
    missing, _ = _line(rep, "x", {"r": None}, {"r": "<= 1.05"})   # a ratio not measured
    assert missing["met"] is None and missing["ratios"] == {"r": None}
    assert rep.check(1.06, "<= 1.05") is False and rep.check(1e-7, "<= 1e-4") is True
    with pytest.raises(ValueError):
        rep.check(1.0, "at least 1")


def test_ratios_keep_small_values(rep):
    line, _ = _line(rep, "x", {"rel": 6.693e-07, "big": 57123.4})
    assert line["ratios"]["rel"] == pytest.approx(6.693e-07) and line["ratios"]["big"] == 57120.0


def _quick_and_report(path: Path) -> tuple[bool, bool]:
    """Does the script declare ``--quick``, and call ``_report.report`` (``import _report``) or
    ``report`` imported with ``from _report import report [as name]``?"""
    tree = ast.parse(path.read_text())
    names = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
             and node.module == "_report" for a in node.names if a.name == "report"}
    quick = report = False
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if (isinstance(f, ast.Attribute) and f.attr == "add_argument" and node.args
                and isinstance(node.args[0], ast.Constant) and node.args[0].value == "--quick"):
            quick = True
        if (isinstance(f, ast.Attribute) and f.attr == "report"
                and getattr(f.value, "id", None) == "_report") or getattr(f, "id", None) in names:
            report = True
    return quick, report


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_every_benchmark_has_quick_and_ends_with_the_json_line(path):
    quick, report = _quick_and_report(path)
    assert quick, f"{path.name}: no --quick option (make bench runs it with --quick)"
    assert report, f"{path.name}: does not call _report.report(...) for its closing JSON line"


def test_make_bench_runs_every_benchmark():
    make = (ROOT / "Makefile").read_text()
    listed = re.search(r"^BENCHMARKS\s*:=\s*((?:.*\\\n)*.*)$", make, re.M).group(1)
    names = set(listed.replace("\\\n", " ").split())
    missing = {p.stem for p in SCRIPTS} - names
    assert not missing, f"benchmarks not in the Makefile's BENCHMARKS: {sorted(missing)}"
    assert re.search(r"^bench:", make, re.M)
