"""Build the Binder environment from ``binder/`` in a fresh venv, run a notebook in it, measure memory.

What mybinder.org does (repo2docker's Python build pack): copy the repository, create an
environment with the Python named in ``binder/runtime.txt``, run
``pip install -r binder/requirements.txt`` from the repository root, run ``binder/postBuild``,
start Jupyter.  This script
does the same in a temporary folder, then executes the notebook headless with nbclient, with the
notebook's own parameters (what a Binder user gets when pressing "Run All"), and reports

* the exact peak RSS of the kernel process (``getrusage(RUSAGE_CHILDREN).ru_maxrss`` of the
  process that ran nbclient, read after the kernel exited),
* the peak of the summed PSS (proportional set size: shared pages split between the processes
  sharing them) of the kernel's process tree and of the whole tree including the nbclient parent,
  sampled from ``/proc/PID/smaps_rollup`` every 50 ms (and the summed RSS, which counts the pages
  a forked child shares with the kernel twice),
* with ``--server``: the PSS of an idle ``jupyter lab`` server from the same venv, the one process
  a Binder user has that nbclient does not start,

and PASS/FAIL against the limit (1.5 GB by default; Binder kills pods at about 2 GB).  What is
held against the limit is what a Binder pod holds: the kernel (the larger of its exact peak RSS
and its process tree's sampled PSS, so workers it starts count) plus one Jupyter server -- the
measured idle server with ``--server``, else the nbclient parent standing in for it.  With
``--server`` the nbclient parent is reported but not counted: a Binder pod runs no nbclient.

RSS and PSS count the file pages a process maps (the safetensors weights, torch's libraries) as
held, but under a pod's memory limit the kernel reclaims clean file pages (and reads them again
when touched) before it kills anything; only memory it cannot reclaim gets a process OOM-killed.
So the report also gives the kernel tree's peak anonymous memory, and ``--enforce`` (root; cgroup
v1, or v2 with the memory controller delegated) runs each notebook inside a memory cgroup of the
limit, less the idle server with ``--server``, with nbclient inside it too, after dropping the page
cache so that what the notebook reads is charged to it as in a fresh pod: PASS then means the
kernel's own verdict, no OOM kill, and the wall time shows what reclaiming cost.

Offline substitution.  ``binder/requirements.txt`` takes torch from the PyTorch CPU index
(``--extra-index-url https://download.pytorch.org/whl/cpu``), which keeps Binder's image small.
When that index cannot be reached (as on the offline build machine), the line is dropped and
nothing else changes: the pinned ``torch==...`` line then resolves through pip's ordinary
configuration (here the local CPU wheel ``torch-2.13.0+cpu`` in ``/opt/wheels``).  The script
prints which case it used, and fails if the installed torch is a CUDA build.

Usage:  python3 scripts/check_binder.py [notebooks/01_quickstart.ipynb ...] [--server]
        [--keep DIR] [--limit-gb 1.5] [--enforce]
Exit status 0 when every notebook ran without an error output and stayed under the limit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
MiB = 1024 * 1024

# Runs inside the Binder venv: execute one notebook with nbclient, then report what it measured.
RUNNER = r"""
import json, resource, sys, time
import nbformat
from nbclient import NotebookClient

path, cwd = sys.argv[1], sys.argv[2]
nb = nbformat.read(path, as_version=4)
nb.cells.append(nbformat.v4.new_code_cell(
    "import sys as _s, torch as _t; "
    "print('__PROBE__' + repr((_s.executable, _t.__version__, _t.version.cuda)))"))
t0 = time.perf_counter()
try:  # a kernel killed for memory (--enforce) raises DeadKernelError: reported, not a crash of the check
    NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": cwd}}).execute()
    died = []
except Exception as exc:  # noqa: BLE001
    died = [f"{type(exc).__name__}: {str(exc)[:200]}"]
wall = time.perf_counter() - t0
errors = died + [o.get("ename", "") + ": " + o.get("evalue", "") for c in nb.cells if c.cell_type == "code"
                 for o in c.outputs if o.output_type == "error"]
probe = [o.get("text", "") for o in nb.cells[-1].outputs if "__PROBE__" in o.get("text", "")]
print("__RESULT__" + json.dumps({
    "wall_s": wall, "errors": errors,
    "probe": probe[0].split("__PROBE__", 1)[1].strip() if probe else None,
    # Linux: ru_maxrss in KiB.  CHILDREN = the largest waited-for descendant: the kernel.
    "kernel_maxrss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    "parent_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}))
"""


def log(msg: str) -> None:
    print(f"[check_binder {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- the environment


def runtime_python() -> str:
    """The interpreter named by binder/runtime.txt (``python-3.11`` -> ``python3.11``)."""
    runtime = (ROOT / "binder" / "runtime.txt").read_text().strip()
    version = runtime.removeprefix("python-")
    exe = shutil.which(f"python{version}")
    if exe is None:
        raise SystemExit(f"binder/runtime.txt asks for {runtime}, but python{version} is not on PATH")
    return exe


def index_reachable(url: str, timeout: float = 5.0) -> bool:
    try:
        with urllib.request.urlopen(url + "/", timeout=timeout) as resp:
            return resp.status < 400
    except Exception:  # noqa: BLE001 - any failure means "not reachable from here"
        return False


def requirements_for_here(dest: Path) -> list[str]:
    """binder/requirements.txt as pip will read it here; returns the substitutions made."""
    lines = (ROOT / "binder" / "requirements.txt").read_text().splitlines()
    changes = []
    if any(CPU_INDEX in line for line in lines) and not index_reachable(CPU_INDEX):
        lines = [line for line in lines if CPU_INDEX not in line]
        changes.append(f"dropped '--extra-index-url {CPU_INDEX}' (unreachable); the torch pin "
                       "resolves through pip's own configuration (find-links / mirrors)")
    dest.write_text("\n".join(lines) + "\n")
    return changes


def copy_repo(dest: Path) -> None:
    """Tracked and untracked-but-not-ignored files, as a fresh clone (plus work in progress) has."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                         check=True, capture_output=True).stdout.decode()
    for rel in filter(None, out.split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def build_env(work: Path) -> tuple[Path, Path, dict]:
    repo, venv = work / "repo", work / "venv"
    t0 = time.perf_counter()
    copy_repo(repo)
    req = work / "binder-requirements.txt"
    changes = requirements_for_here(req)
    for change in changes:
        log("substitution: " + change)
    if not changes:
        log(f"{CPU_INDEX} is reachable: binder/requirements.txt is used unchanged")
    py = runtime_python()
    subprocess.run([py, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["--upgrade", "pip"], check=True)
    t_pip = time.perf_counter()
    subprocess.run(pip + ["-r", str(req)], cwd=repo, check=True)   # what repo2docker runs
    install_s = time.perf_counter() - t_pip
    if (repo / "binder" / "postBuild").exists():  # repo2docker runs it next, with the env's Python
        env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"}
        subprocess.run(["bash", "binder/postBuild"], cwd=repo, check=True, env=env)
    info = subprocess.run([str(venv / "bin" / "python"), "-c",
                           "import torch, lora_lab, jupyterlab, ipywidgets, anywidget, nbclient; "
                           "print(torch.__version__, torch.version.cuda, lora_lab.__file__)"],
                          cwd=work, check=True, capture_output=True, text=True).stdout.split()
    if info[1] != "None":
        raise SystemExit(f"the Binder env got a CUDA build of torch ({info[0]}, CUDA {info[1]})")
    if not info[2].startswith(str(repo)):
        raise SystemExit(f"lora_lab imports from {info[2]}, not from the copied repository")
    size = sum(f.stat().st_size for f in venv.rglob("*") if f.is_file() and not f.is_symlink())
    facts = {"python": py, "torch": info[0], "venv_mib": size / MiB, "pip_install_s": install_s,
             "build_s": time.perf_counter() - t0, "substitutions": changes}
    log(f"env built in {facts['build_s']:.0f} s (pip install -r: {install_s:.0f} s): "
        f"torch {info[0]} (CPU), venv {facts['venv_mib']:.0f} MiB on disk")
    return repo, venv, facts


# ---------------------------------------------------------------- memory


def tree_pids(root_pid: int) -> list[int]:
    """``root_pid`` and all its living descendants (from /proc/*/stat)."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    pids, frontier = [], [root_pid] if root_pid in parent else []
    while frontier:
        pid = frontier.pop()
        pids.append(pid)
        frontier.extend(p for p, pp in parent.items() if pp == pid)
    return pids


def memory_of(pid: int) -> tuple[int, int, int]:
    """(RSS, PSS, anonymous) in bytes.  PSS splits shared pages between the processes sharing them,
    so a forked child (which shares its parent's pages until it execs) is not counted twice.  The
    rest of RSS beyond the anonymous pages is file pages (mapped weights, libraries): the kernel can
    drop those under a memory limit and read them again (see :class:`MemoryCgroup`)."""
    found = {"Rss:": 0, "Pss:": 0, "Anonymous:": 0}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key = line.split(maxsplit=1)[0]
                if key in found:
                    found[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return found["Rss:"], found["Pss:"], found["Anonymous:"]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:120]
    except OSError:
        return "?"


class PeakSampler(threading.Thread):
    """Samples a process tree every ``interval`` s: peak of the summed PSS (whole tree, and all but
    the root) and peak of the summed RSS (whole tree; counts pages shared after a fork twice)."""

    def __init__(self, root_pid: int, interval: float = 0.05):
        super().__init__(daemon=True)
        self.root, self.interval = root_pid, interval
        self.peak_pss = self.peak_pss_children = self.peak_rss = self.peak_anon_children = 0
        self.samples = 0
        self.per_pid: dict[int, list] = {}   # pid -> [peak PSS, samples seen, command line]
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            mem = {pid: memory_of(pid) for pid in tree_pids(self.root)}
            for pid, (_, pss, _) in mem.items():
                seen = self.per_pid.setdefault(pid, [0, 0, _cmdline(pid)])
                seen[0], seen[1] = max(seen[0], pss), seen[1] + 1
            if mem:
                self.samples += 1
                children = [m for pid, m in mem.items() if pid != self.root]
                self.peak_rss = max(self.peak_rss, sum(m[0] for m in mem.values()))
                self.peak_pss = max(self.peak_pss, sum(m[1] for m in mem.values()))
                self.peak_pss_children = max(self.peak_pss_children, sum(m[1] for m in children))
                self.peak_anon_children = max(self.peak_anon_children, sum(m[2] for m in children))
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


class MemoryCgroup:
    """A memory cgroup with a hard limit, as a Binder pod runs in (Kubernetes puts the pod's memory
    limit on one).  The kernel charges it with the anonymous memory of the processes inside and with
    the page cache they touch (file pages of mapped weights and libraries); at the limit it first
    reclaims clean file pages (they are read again when touched: slower, not fatal), and only what
    cannot be reclaimed gets a process OOM-killed.  RSS counts those file pages as held, so RSS and
    PSS overstate what a pod may be killed for; a run inside this cgroup is the kernel's own verdict.
    cgroup v1's memory controller, else v2 (needs root; v2 also needs memory in the parent's
    subtree_control, and was not available to test here).  Swap is limited with it where the files
    exist (Binder pods have none)."""

    def __init__(self, limit_bytes: int):
        v1 = Path("/sys/fs/cgroup/memory")
        self.v2 = not v1.is_dir()
        self.path = (Path("/sys/fs/cgroup") if self.v2 else v1) / f"lora_lab_binder_{os.getpid()}"
        try:
            self.path.mkdir()
            limits = ("memory.max", "memory.swap.max") if self.v2 else \
                ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes")
            (self.path / limits[0]).write_text(str(limit_bytes))
            if (self.path / limits[1]).exists():
                (self.path / limits[1]).write_text("0" if self.v2 else str(limit_bytes))
        except OSError as exc:
            raise SystemExit(f"--enforce needs a writable memory cgroup (root): {exc}") from exc
        # what the notebook touches must be charged here, as in a fresh pod: drop the page cache
        subprocess.run(["sync"], check=False)
        Path("/proc/sys/vm/drop_caches").write_text("3")

    def enter(self) -> None:
        """In the child, before exec (``Popen(preexec_fn=...)``): move this process in."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def verdict(self) -> dict:
        """Peak charge (MiB; at the limit, the kernel reclaimed pages to stay under it) and OOM kills."""
        read = lambda name: (self.path / name).read_text()  # noqa: E731
        events = dict(line.split() for line in read("memory.events" if self.v2 else "memory.oom_control")
                      .splitlines())
        peak = read("memory.peak" if self.v2 else "memory.max_usage_in_bytes")
        return {"peak_mib": int(peak) / MiB, "oom_kills": int(events.get("oom_kill", 0))}

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass


def run_notebook(repo: Path, venv: Path, notebook: str, cgroup: MemoryCgroup | None = None) -> dict:
    path = repo / notebook
    # mybinder.org tells the pod its memory limit in MEM_LIMIT (bytes); notebooks may size themselves by it
    env = {**os.environ, "MEM_LIMIT": os.environ.get("MEM_LIMIT", str(2 * 1024**3))}
    proc = subprocess.Popen([str(venv / "bin" / "python"), "-c", RUNNER, str(path), str(path.parent)],
                            cwd=path.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=cgroup.enter if cgroup else None)
    sampler = PeakSampler(proc.pid)
    sampler.start()
    out, err = proc.communicate()
    sampler.stop()
    if proc.returncode != 0 or "__RESULT__" not in out:
        raise SystemExit(f"running {notebook} failed (exit {proc.returncode}):\n{err[-4000:]}")
    result = json.loads(out.split("__RESULT__", 1)[1])
    exe = result["probe"] and eval(result["probe"])[0]  # noqa: S307 - our own repr of a tuple
    # (a kernel killed for memory ran no probe: its errors say so)
    if (exe or not result["errors"]) and not (exe and exe.startswith(str(venv))):
        raise SystemExit(f"the kernel ran {exe!r}, not the Binder venv's Python")
    result["processes"] = sorted(([round(v[0] / MiB), v[1], v[2]] for v in sampler.per_pid.values()),
                                 reverse=True)
    result.update(tree_pss_mib=sampler.peak_pss / MiB, kernel_tree_pss_mib=sampler.peak_pss_children / MiB,
                  tree_rss_mib=sampler.peak_rss / MiB, kernel_anon_mib=sampler.peak_anon_children / MiB,
                  samples=sampler.samples)
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def idle_server_rss(repo: Path, venv: Path, seconds: float = 5.0) -> float:
    """PSS (MiB) of ``jupyter lab`` from the venv once it answers, idle, no kernel running."""
    port = free_port()
    proc = subprocess.Popen([str(venv / "bin" / "jupyter"), "lab", "--no-browser", f"--port={port}",
                             "--ServerApp.token=", "--ServerApp.ip=127.0.0.1", "--allow-root"],
                            cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/lab", timeout=2).read()
                break
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.5)
        else:
            raise SystemExit("jupyter lab did not start within 120 s")
        sampler = PeakSampler(proc.pid)
        sampler.start()
        time.sleep(seconds)
        sampler.stop()
        return sampler.peak_pss / MiB
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("notebooks", nargs="*", default=["notebooks/01_quickstart.ipynb"])
    ap.add_argument("--limit-gb", type=float, default=1.5)
    ap.add_argument("--server", action="store_true", help="also measure an idle jupyter lab server")
    ap.add_argument("--keep", type=Path, help="build in (and keep) this folder instead of a temp dir")
    ap.add_argument("--venv", type=Path, help="skip the build and run in this existing venv "
                    "(a diagnostic of the notebooks' memory, not a check of binder/)")
    ap.add_argument("--enforce", action="store_true",
                    help="run each notebook inside a memory cgroup of the limit (less the idle server with "
                         "--server), as a Binder pod: PASS means no OOM kill (root; drops the page cache)")
    ap.add_argument("--reuse", action="store_true",
                    help="with --keep: run the notebooks in the environment built there before")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    log(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}")
    work = args.keep or Path(tempfile.mkdtemp(prefix="lora_lab_binder_"))
    reuse = args.reuse and args.keep and (work / "venv" / "bin" / "python").exists()
    if args.keep and work.exists() and not reuse:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    # Binder's home cache, as its image holds it after postBuild (the notebooks read it too)
    if not args.venv:  # with --venv, the cache of the environment being diagnosed is used
        os.environ["LORA_LAB_CACHE"] = str(work / "cache")
    ok = True
    try:
        if args.venv:
            copy_repo(work / "repo")
            repo, venv = work / "repo", args.venv.resolve()
            log(f"using the existing environment {venv}: NOT a check of binder/")
        elif reuse:
            repo, venv = work / "repo", work / "venv"
            log(f"reusing the environment in {work} (not rebuilt)")
        else:
            build_env(work)
            repo, venv = work / "repo", work / "venv"
        limit_mib = args.limit_gb * 1000 ** 3 / MiB
        server_mib = idle_server_rss(repo, venv) if args.server else None
        if server_mib is not None:
            log(f"idle jupyter lab server: {server_mib:.0f} MiB PSS")
        for nb in args.notebooks:
            log(f"running {nb} with its own parameters ...")
            cgroup = MemoryCgroup(int((limit_mib - (server_mib or 0)) * MiB)) if args.enforce else None
            try:
                r = run_notebook(repo, venv, nb, cgroup)
                verdict = cgroup.verdict() if cgroup else None
            finally:
                if cgroup:
                    cgroup.remove()
            # A Binder pod holds the kernel (with any children it starts) and one Jupyter server.
            # The kernel counts at the larger of its exact peak RSS and its tree's sampled PSS; the
            # server at its measured PSS (--server), else nbclient's parent stands in for it.  With
            # --server nbclient is not counted: a Binder pod has no nbclient (it is reported).
            kernel = max(r["kernel_maxrss_mib"], r["kernel_tree_pss_mib"])
            other = server_mib if server_mib is not None else r["parent_maxrss_mib"]
            peak = kernel + other
            passed = not r["errors"] and (verdict["oom_kills"] == 0 if verdict else peak < limit_mib)
            ok &= passed
            log(f"{nb}: {r['wall_s']:.0f} s, errors {len(r['errors'])}; peak RSS of the kernel "
                f"{r['kernel_maxrss_mib']:.0f} MiB (exact), of the nbclient parent "
                f"{r['parent_maxrss_mib']:.0f} MiB; sampled peaks ({r['samples']} samples): tree PSS "
                f"{r['tree_pss_mib']:.0f} MiB, kernel tree PSS {r['kernel_tree_pss_mib']:.0f} MiB, tree RSS "
                f"{r['tree_rss_mib']:.0f} MiB; anonymous memory of the kernel tree "
                f"{r['kernel_anon_mib']:.0f} MiB (the rest is file pages)")
            for pss, samples, cmd in r["processes"][:5]:
                log(f"  peak PSS {pss:5d} MiB, seen in {samples:5d} samples: {cmd}")
            for e in r["errors"]:
                log("  error output: " + e[:300])
            if verdict:
                cap = limit_mib - (server_mib or 0)
                reclaimed = " (the limit: pages were reclaimed)" if verdict["peak_mib"] >= cap - 1 else ""
                log(f"enforced: a memory cgroup of {cap:.0f} MiB held nbclient and "
                    f"the kernel{' (the idle server taken off)' if server_mib else ''}: peak charge "
                    f"{verdict['peak_mib']:.0f} MiB{reclaimed}, OOM kills "
                    f"{verdict['oom_kills']}: {'PASS' if passed else 'FAIL'} in {r['wall_s']:.0f} s")
                continue
            who = "idle server" if server_mib is not None else "nbclient parent, standing in for the server"
            log(f"{'PASS' if passed else 'FAIL'}: kernel {kernel:.0f} MiB + {who} {other:.0f} MiB = "
                f"{peak:.0f} MiB against a limit of {limit_mib:.0f} MiB ({args.limit_gb} GB); headroom "
                f"{limit_mib - peak:.0f} MiB"
                + (f" ({limit_mib - peak - r['parent_maxrss_mib']:.0f} MiB if nbclient's parent "
                   f"counted too)" if server_mib is not None else ""))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    log(f"whole check: {time.perf_counter() - t0:.0f} s, load average now {os.getloadavg()[0]:.2f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
