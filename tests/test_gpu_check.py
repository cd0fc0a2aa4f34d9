"""scripts/gpu_check.py (issue 20): the dry run, the CPU smoke run, and the runner's isolation.

The real run needs a CUDA GPU (``test_full_run_on_a_gpu``, skipped without one); here the same
script lists its checks, runs them at tiny sizes on the CPU, and writes the JSON summary whose
schema the GPU run will have.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
CHECKS = ["env", "bnb_4bit", "qlora_train", "memory_planner", "merge", "paged_optimizer",
          "export_accelerate", "throughput", "switching", "compile"]
STATUSES = {"pass", "fail", "error", "skipped", "info"}


def _module():
    """The script as a module (registered first: its dataclasses look their module up)."""
    name = "gpu_check_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _run(args: list[str], cwd: Path, timeout: float, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "OUT"}
    environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **env)
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=environ,
                          capture_output=True, text=True, timeout=timeout)


def _summary(proc: subprocess.CompletedProcess, folder: Path, mode: str) -> dict:
    """The summary on stdout (stdout holds nothing else) equals the file, and has the schema."""
    printed = json.loads(proc.stdout)
    written = json.loads((folder / "gpu_check.json").read_text())
    assert printed == written
    s = written
    assert s["schema"] == "lora_lab.gpu_check/1" and s["mode"] == mode
    assert {"started", "seconds", "budget_s", "packages", "wheels", "checks", "counts", "ok"} <= set(s)
    assert set(s["counts"]) == STATUSES and sum(s["counts"].values()) == len(s["checks"])
    assert s["ok"] == (s["counts"]["fail"] == 0 and s["counts"]["error"] == 0)
    names = [c["name"] for c in s["checks"]]
    assert names == [n for n in CHECKS if n in names]             # in order of value
    for c in s["checks"]:
        assert c["status"] in STATUSES and c["needs"][0] == "torch" and c["what"]
        assert c["status"] not in ("skipped", "info") or c.get("reason")
    return s


def test_dry_run_lists_every_check_and_what_it_needs(tmp_path):
    proc = _run(["--dry-run", str(tmp_path / "out")], tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    s = _summary(proc, tmp_path / "out", "dry-run")
    assert [c["name"] for c in s["checks"]] == CHECKS
    needs = {c["name"]: c["needs"] for c in s["checks"]}
    assert "bitsandbytes" in needs["qlora_train"] and "datasets" in needs["export_accelerate"]
    assert all("datasets" not in n for name, n in needs.items() if name != "export_accelerate")
    assert all(c["status"] == "skipped" and isinstance(c["missing"], list) for c in s["checks"])
    assert {"torch", "bitsandbytes", "datasets", "plotly"} <= set(s["packages"])
    assert set(s["wheels"]) >= {"dir", "files", "missing_here"}
    assert "export_accelerate" in proc.stderr                     # the list for people


def test_dry_run_writes_to_OUT_when_no_folder_is_given(tmp_path):
    proc = _run(["--dry-run"], tmp_path, timeout=60, OUT=str(tmp_path / "from-env"))
    assert proc.returncode == 0, proc.stderr
    _summary(proc, tmp_path / "from-env", "dry-run")


def test_without_a_gpu_the_real_run_refuses(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = _run([str(tmp_path)], tmp_path, timeout=120)
    assert proc.returncode == 2 and "--cpu-smoke" in proc.stderr


def test_cpu_smoke_runs_the_checks_at_tiny_sizes(tmp_path):
    proc = _run(["--cpu-smoke", str(tmp_path / "out"), "--only",
                 "env,bnb_4bit,qlora_train,merge,switching,compile"], tmp_path, timeout=400)
    s = _summary(proc, tmp_path / "out", "cpu-smoke")
    status = {c["name"]: c["status"] for c in s["checks"]}
    assert proc.returncode == 0 and s["ok"], json.dumps(s, indent=1)[-4000:]
    from lora_lab.hf.training.compile import compiler_missing

    assert status == {"env": "pass", "bnb_4bit": "pass", "qlora_train": "pass", "merge": "pass",
                      "switching": "pass", "compile": "skipped" if compiler_missing("cpu") else "pass"}
    c = {c["name"]: c for c in s["checks"]}
    assert c["env"]["lora_lab_train_precision"] == "fp32"
    assert abs(c["bnb_4bit"]["nf4"]["cpu_mean_abs_err"] - 0.073) < 0.003
    runs = c["qlora_train"]["runs"]
    assert set(runs) == {"builtin:tiny fp32", "llama-mini fp32"}
    assert all(r["falls"] and r["dashboard_memory_from_rss"] for r in runs.values())
    assert c["merge"]["qlora_merged_copy"]["vs_unmerged_fp32_rel"] < 1e-5
    assert c["switching"]["speedup"] > 1 and c["switching"]["logit_gap_vs_peft"] < 1e-6
    assert c["switching"]["mixed_batch"]["peft_adapter_names_tokens_per_s"] > 0
    assert c["switching"]["mixed_batch"]["lora_lab_stacked_logit_gap_vs_peft"] < 1e-5
    if status["compile"] == "pass":
        compiled = c["compile"]["runs"]
        assert set(compiled) == {"fp32 eager", "fp32 compiled"}
        assert compiled["fp32 compiled"]["calls_captured"] > 0


@pytest.mark.slow
def test_cpu_smoke_planner_optimizers_export_and_throughput(tmp_path):
    proc = _run(["--cpu-smoke", str(tmp_path / "out"), "--only",
                 "memory_planner,paged_optimizer,export_accelerate,throughput"], tmp_path, timeout=400)
    s = _summary(proc, tmp_path / "out", "cpu-smoke")
    assert proc.returncode == 0 and s["ok"], json.dumps(s, indent=1)[-4000:]
    c = {c["name"]: c for c in s["checks"]}
    assert c["memory_planner"]["status"] == "info" and len(c["memory_planner"]["setups"]) == 2
    assert all(r["train_s"] > 0 and r["est_reserved_gib"] > 0 for r in c["memory_planner"]["setups"])
    opts = {k: v for k, v in c["paged_optimizer"].items() if isinstance(v, dict)}
    assert set(opts) == {"paged_adamw_8bit", "adamw_8bit", "paged_adamw"}
    assert all(v["refused_on_cpu"] for v in opts.values())     # bitsandbytes' optimizers are CUDA-only
    assert c["export_accelerate"]["status"] == "pass", json.dumps(c["export_accelerate"], indent=1)
    assert c["export_accelerate"]["adapter_spec_equal"] and len(c["export_accelerate"]["losses"]) == 2
    assert c["throughput"]["status"] == "info"
    assert set(c["throughput"]["tokens_per_s"]) == {"plain", "lora_lab", "trainer"}


# ----------------------------------------------------------------------------- the runner
def _ctx(module, tmp_path, seconds_left: float):
    return module.Ctx(device="cpu", sizes=module.CPU_SIZES, tmp=tmp_path,
                      deadline=time.time() + seconds_left)


def test_a_failing_check_is_recorded_with_what_it_had_done(tmp_path):
    m = _module()

    def boom(ctx):
        ctx.partial["done"] = 1
        raise ValueError("broken on purpose")

    row = m.run_check(m.Check("boom", boom, ("torch",), 10, "fails"), _ctx(m, tmp_path, 60))
    assert row["status"] == "error" and row["error"].startswith("ValueError: broken on purpose")
    assert "boom" in row["traceback"] and row["partial"] == {"done": 1}
    ok = m.run_check(m.Check("fine", lambda ctx: m.verdict([], x=1), ("torch",), 10, "passes"),
                     _ctx(m, tmp_path, 60))
    assert ok["status"] == "pass" and ok["x"] == 1 and "partial" not in ok


def test_time_limits_skips_and_missing_packages(tmp_path):
    m = _module()
    slow = m.Check("slow", lambda ctx: time.sleep(30), ("torch",), 0.5, "sleeps")
    row = m.run_check(slow, _ctx(m, tmp_path, 1.0))               # the deadline cuts it at ~1 s
    assert row["status"] == "error" and row["error"].startswith("CheckTimeout") and row["seconds"] < 10
    late = m.run_check(m.Check("late", lambda ctx: {}, ("torch",), 10, "x"), _ctx(m, tmp_path, -1))
    assert late["status"] == "skipped" and late["reason"].startswith("out of time")
    odd = m.run_check(m.Check("odd", lambda ctx: {}, ("torch", "no_such_package_xyz"), 10, "x"),
                      _ctx(m, tmp_path, 60))
    assert odd["status"] == "skipped" and "no_such_package_xyz" in odd["reason"]


def test_wheel_plan_installs_only_what_is_missing(tmp_path):
    m = _module()
    for name in ("torch-9.9-py3-none-any.whl", "no_such_package_xyz-1.0-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    plan = m.wheel_plan(tmp_path)
    assert plan["missing_here"] == ["no_such_package_xyz-1.0-py3-none-any.whl"]
    assert m.wheel_plan(tmp_path / "nothing-here") == {"dir": str(tmp_path / "nothing-here"), "files": [],
                                                       "missing_here": []}


@pytest.mark.gpu
@pytest.mark.slow
def test_full_run_on_a_gpu(tmp_path):
    proc = _run([str(tmp_path / "out")], tmp_path, timeout=600)
    s = _summary(proc, tmp_path / "out", "gpu")
    assert s["ok"], json.dumps([c for c in s["checks"] if c["status"] in ("fail", "error")], indent=1)
