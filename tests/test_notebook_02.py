"""02_choosing_rank runs headless with reduced parameters and shows what it teaches.

Bounds measured with RANKS=(1, 8), STEPS=300, SEED=0 on CPU (subtract, 200 held-out rows):
accuracy r=1 0.105, r=8 0.405; r=8 compressed to its median k90 (3) 0.255; median φ(1, 1) between
the r=1 and r=8 adapters 0.036 against a random baseline of 1/128 = 0.0078.  About 45 s.
Re-measured 2026-12 with the paper's φ (LoRA §7.2, singular vectors of A): accuracy r=1 0.08, r=8
0.51, compressed 0.34; median φ(1, 1) 0.039 from A, 0.042 ordered by ΔW; φ(1, 8) 0.144 from both.
"""

import pytest
from notebook_runner import run_notebook


@pytest.mark.slow
def test_choosing_rank_notebook_measures_rank(tmp_path):
    values, nb = run_notebook(
        "02_choosing_rank.ipynb", {"RANKS": (1, 8), "STEPS": 300}, cwd=tmp_path,
        probe=("sweep_table_rows", "acc_by_rank", "acc_high", "acc_compressed", "K",
               "phi_top", "phi_random", "phi_top_delta", "phi_full", "phi_full_delta"))
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors, errors
    acc = {int(r): a for r, a in values["acc_by_rank"].items()}
    assert values["sweep_table_rows"] == 2 and sorted(acc) == [1, 8], values
    # subtract is a task where rank matters: r=8 beats r=1 clearly (measured 0.405 vs 0.105)
    assert acc[8] > acc[1] + 0.15, values
    # the adapter reloaded from the sweep's files scores what the sweep measured
    assert abs(values["acc_high"] - acc[8]) <= 0.005, values
    # compressed after training to k90 < r: keeps most of it and still beats training at r=1
    assert 1 <= values["K"] < 8, values
    assert values["acc_compressed"] >= acc[8] - 0.25, values
    assert values["acc_compressed"] > acc[1] + 0.05, values
    # subspace similarity of the top directions: a valid φ, well above two random directions
    assert 0 < values["phi_top"] <= 1, values
    assert values["phi_top"] > 2 * values["phi_random"], values
    assert 0 < values["phi_top_delta"] <= 1, values
    # at full rank (φ(r_low, r_high)) A's and ΔW's singular vectors span the same space: equal φ
    assert abs(values["phi_full"] - values["phi_full_delta"]) < 1e-6, values
