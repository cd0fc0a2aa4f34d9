"""The workshop notebooks: solutions pass every check, exercises fail at the first check with a helpful
message, wrong answers fail their check, and both notebooks share the same check cells."""

import math

import nbformat
import pytest
from nbclient.exceptions import CellExecutionError

from notebook_runner import NOTEBOOKS, parameter_cell, run_notebook

WORKSHOP = NOTEBOOKS / "workshop"
EXERCISES = 7


def _read(name):
    return nbformat.read(WORKSHOP / name, as_version=4)


def _tags(cell):
    return cell.metadata.get("tags", [])


def test_exercises_and_solutions_share_their_check_cells():
    ex, sol = _read("exercises.ipynb"), _read("solutions.ipynb")
    assert len(ex.cells) == len(sol.cells)
    checks = 0
    for i, (a, b) in enumerate(zip(ex.cells, sol.cells)):
        assert (a.cell_type, _tags(a)) == (b.cell_type, _tags(b)), f"cell {i} differs in kind"
        if "exercise" in _tags(a):
            assert "..." in a.source, f"exercise cell {i} has no `...` placeholder:\n{a.source}"
            assert "..." not in b.source, f"solution cell {i} still has a placeholder:\n{b.source}"
            assert "check" in _tags(ex.cells[i + 1]), f"exercise cell {i} is not followed by a check cell"
        elif i > 0:                       # everything but the title is shared, checks included
            assert a.source == b.source, f"cell {i} differs between exercises and solutions"
        if "check" in _tags(a):
            checks += 1
            assert "assert " in a.source and "Exercise " in a.source
    assert checks >= EXERCISES
    for name, nb in (("exercises.ipynb", ex), ("solutions.ipynb", sol)):
        first = nb.cells[0].source
        assert f"colab.research.google.com/github/lora-lab/lora_lab/blob/main/notebooks/workshop/{name}" in first
        assert "MODEL = " in parameter_cell(nb).source
        assert 'output.enable_custom_widget_manager()' in nb.cells[2].source


def _namespace_after_solutions(skip=("ll.train(", "Exercise 6")):
    """Run the solutions' cells in-process, without the training exercise; return the namespace and
    the check cells by exercise number."""
    nb = _read("solutions.ipynb")
    ns, checks = {}, {}
    for cell in nb.cells:
        if cell.cell_type != "code" or any(s in cell.source for s in skip):
            continue
        if "check" in _tags(cell):
            n = int(cell.source.split("Exercise ")[1].split(":")[0])
            checks[n] = cell.source
        exec(compile(cell.source, "<workshop>", "exec"), ns)
    return ns, checks


WRONG = {  # exercise: (variable, wrong value from the namespace), each a plausible mistake
    1: ("my_count", lambda ns: ns["my_count"] // 2),                  # q_proj only
    2: ("s_lora", lambda ns: 16 / math.sqrt(64)),                      # the rsLoRA rule
    3: ("bits_dq", lambda ns: 4.5),                                     # without double quantization
    4: ("eff_rank", lambda ns: float((ns["sigma"] > 0).sum())),        # the plain rank
    5: ("k90", lambda ns: ns["k90"] + 1),
    7: ("qlora_gpu", lambda ns: "L4"),
}


@pytest.mark.slow
def test_checks_reject_wrong_answers(one_thread):
    ns, checks = _namespace_after_solutions()
    assert set(WRONG) <= set(checks)
    for n, (var, wrong) in WRONG.items():
        exec(compile(checks[n], "<check>", "exec"), dict(ns))          # the right answer passes
        bad = dict(ns)
        bad[var] = wrong(ns)
        with pytest.raises(AssertionError, match=f"Exercise {n}: "):
            exec(compile(checks[n], "<check>", "exec"), bad)


@pytest.mark.slow
def test_solutions_run_and_pass_every_check(tmp_path):
    values, nb = run_notebook("workshop/solutions.ipynb", cwd=tmp_path, probe=("acc_before", "acc_after"))
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    for n in range(1, EXERCISES + 1):
        assert f"✓ Exercise {n}:" in text, f"exercise {n} printed no ✓"
    assert values["acc_before"] < 0.2 and values["acc_after"] >= 0.8, values


@pytest.mark.slow
def test_exercises_as_stored_fail_at_the_first_check_with_a_hint(tmp_path):
    with pytest.raises(CellExecutionError) as info:
        run_notebook("workshop/exercises.ipynb", cwd=tmp_path)
    message = str(info.value)
    assert "AssertionError" in message
    assert "Exercise 1: `my_count` is still the placeholder" in message
    assert "r·(in + out)" in message                                   # the hint
