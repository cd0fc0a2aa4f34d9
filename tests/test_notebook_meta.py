"""Every notebook opens the same way (Colab badge, parameter cell, setup cell), and the README's
badges and notebook list point at files that exist.  Covers whatever notebooks are in notebooks/.

The conventions (DESIGN.md / the helpers' notes): cell 1 markdown with the title and, on its own
line, the Colab badge for this very file; cell 2 code tagged ``parameters`` holding only
``NAME = literal`` lines (CI rewrites them); cell 3 code starting with the standard setup that
installs lora-lab on Colab and enables Colab's custom widget manager.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(p for p in (ROOT / "notebooks").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
# pyproject's [project.urls] Repository (a regex: tomllib is 3.11+ and the package supports 3.10)
REPO_URL = re.search(r'^Repository\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
GH = re.fullmatch(r"https://github\.com/([\w.-]+/[\w.-]+?)/?", REPO_URL).group(1)   # "lora-lab/lora_lab"
BADGE_SVG = "https://colab.research.google.com/assets/colab-badge.svg"

SETUP = '''import importlib.util, subprocess, sys
if "google.colab" in sys.modules:  # Colab: install lora_lab once, and render third-party widgets
    if importlib.util.find_spec("lora_lab") is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                        "lora-lab @ git+%s"], check=True)
    from google.colab import output
    output.enable_custom_widget_manager()
''' % REPO_URL


def colab_badge(rel: str) -> str:
    return f"[![Open In Colab]({BADGE_SVG})](https://colab.research.google.com/github/{GH}/blob/main/{rel})"


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 3, NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=rel)
def test_first_cell_is_title_and_colab_badge_for_this_file(path: Path):
    cells = nbformat.read(path, as_version=4).cells
    first = cells[0]
    assert first.cell_type == "markdown", f"{rel(path)}: cell 1 must be markdown (title, badge, story)"
    lines = first.source.splitlines()
    assert lines and lines[0].startswith("# "), f"{rel(path)}: cell 1 must start with a '# title' line"
    badge = colab_badge(rel(path))
    assert badge in (line.strip() for line in lines), \
        f"{rel(path)}: cell 1 needs, on its own line, the Colab badge for this file:\n{badge}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=rel)
def test_second_cell_is_the_parameter_cell(path: Path):
    cells = nbformat.read(path, as_version=4).cells
    code = [c for c in cells if c.cell_type == "code"]
    assert code and "parameters" in code[0].metadata.get("tags", []), \
        f"{rel(path)}: the first code cell must be tagged 'parameters'"
    assert cells[1] is code[0], f"{rel(path)}: the parameter cell must be cell 2, right after the title"
    tree = ast.parse(code[0].source)
    assert tree.body, f"{rel(path)}: the parameter cell is empty"
    for stmt in tree.body:   # tests/notebook_runner.py rewrites `NAME = value` lines with repr(value)
        ok = (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
              and isinstance(stmt.targets[0], ast.Name) and stmt.lineno == stmt.end_lineno)
        assert ok, f"{rel(path)}: parameter cell line {stmt.lineno} is not a one-line `NAME = value`"
        ast.literal_eval(stmt.value)   # a literal, so CI can override it with repr()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=rel)
def test_third_cell_is_the_standard_setup(path: Path):
    cells = nbformat.read(path, as_version=4).cells
    assert len(cells) > 2 and cells[2].cell_type == "code", f"{rel(path)}: cell 3 must be the setup code"
    assert cells[2].source.startswith(SETUP), \
        f"{rel(path)}: cell 3 must begin with exactly the standard setup:\n{SETUP}"


# ------------------------------------------------------------------- README

README = (ROOT / "README.md").read_text()


def test_readme_binder_badge_opens_an_existing_notebook():
    m = re.search(rf"https://mybinder\.org/v2/gh/{re.escape(GH)}/HEAD\?urlpath=lab/tree/([\w./-]+\.ipynb)",
                  README)
    assert m, f"README needs the mybinder.org badge for {GH}"
    assert (ROOT / m.group(1)).is_file(), f"the Binder badge opens {m.group(1)}, which does not exist"
    assert "https://mybinder.org/badge_logo.svg" in README


def test_readme_names_only_existing_notebooks_and_lists_them_all():
    named = set(re.findall(r"notebooks/[\w./-]+?\.ipynb", README))
    assert named, "README lists no notebooks"
    missing = sorted(n for n in named if not (ROOT / n).is_file())
    assert not missing, f"README names notebooks that do not exist: {missing}"
    unlisted = sorted(rel(p) for p in NOTEBOOKS if rel(p) not in named)
    assert not unlisted, f"README's notebook table does not list: {unlisted}"


def test_readme_colab_badges_point_at_existing_notebooks():
    links = re.findall(rf"https://colab\.research\.google\.com/github/{re.escape(GH)}/blob/main/([\w./-]+)\)",
                       README)
    assert links, "README has no Colab badges"
    assert all((ROOT / p).is_file() for p in links), [p for p in links if not (ROOT / p).is_file()]
