"""Notebooks run top to bottom headless with the builtin model, and compute what they claim."""

from pathlib import Path

import nbformat
import pytest

from notebook_runner import NOTEBOOKS, run_notebook

ALL = sorted(NOTEBOOKS.rglob("*.ipynb"))


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_notebooks_are_stored_clean(path: Path):
    """No outputs and no widget state in git: diffs stay readable (a FigureWidget stores 5 MB)."""
    nb = nbformat.read(path, as_version=4)
    assert "widgets" not in nb.metadata, f"{path.name} stores widget state; clear it before commit"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, \
                f"{path.name} has outputs stored; clear them before commit"


@pytest.mark.slow
def test_quickstart_runs_and_learns(tmp_path):
    values, nb = run_notebook("01_quickstart.ipynb", {"STEPS": 200}, cwd=tmp_path,
                              probe=("acc_before", "acc_after", "acc_disabled", "trainable", "result"))
    assert values["acc_before"] < 0.2
    # the run's repr (stop reason, steps, last loss) rides along: a CI failure here once gave 0.03
    # after training and could not be reproduced, and the accuracies alone could not say why
    assert values["result"].startswith("TrainResult(completed, step 200/200"), values
    assert values["acc_after"] > values["acc_before"] + 0.3, values
    assert values["acc_disabled"] == values["acc_before"]
    assert values["trainable"] > 0
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors
