"""Run a notebook headless with nbclient, overriding its parameter cell, and read values back.

The first code cell tagged ``parameters`` holds lines ``NAME = value``; ``run_notebook`` replaces
the values it is given.  ``probe`` names variables of the notebook to return (via one extra cell
that prints them as JSON), so a test can check what the notebook computed, not just that it ran.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
MARK = "__LORA_LAB_PROBE__"


def parameter_cell(nb) -> "nbformat.NotebookNode":
    for cell in nb.cells:
        if cell.cell_type == "code" and "parameters" in cell.metadata.get("tags", []):
            return cell
    raise AssertionError("the notebook has no code cell tagged 'parameters'")


def run_notebook(name: str, params: dict | None = None, probe: tuple[str, ...] = (),
                 timeout: int = 600, cwd: Path | None = None) -> tuple[dict, "nbformat.NotebookNode"]:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    cell = parameter_cell(nb)
    for key, value in (params or {}).items():
        pattern = re.compile(rf"^{key}\s*=.*$", re.M)
        assert pattern.search(cell.source), f"parameter {key} is not in the parameter cell"
        cell.source = pattern.sub(f"{key} = {value!r}", cell.source)
    if probe:
        code = ("import json as _j\nprint('%s' + _j.dumps({k: globals()[k] for k in %r}, default=str))"
                % (MARK, list(probe)))
        nb.cells.append(nbformat.v4.new_code_cell(code))
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd or NOTEBOOKS)}})
    client.execute()
    values = {}
    if probe:
        for out in nb.cells[-1].outputs:
            text = out.get("text", "")
            if MARK in text:
                values = json.loads(text.split(MARK, 1)[1])
    return values, nb
