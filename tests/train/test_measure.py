"""The peak RSS a run reports is its own process's, not the peak of the process it was started from
(``getrusage`` carries that across exec on Linux)."""

import subprocess
import sys

import numpy as np
import pytest

CHILD = "from lora_lab.train.measure import peak_rss_mb; print(peak_rss_mb())"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="exec carries ru_maxrss on Linux")
def test_a_child_of_a_large_process_reports_its_own_peak():
    held = np.ones(1_200_000_000 // 8)  # 1.2 GB resident here, while the child starts
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
    child_peak = float(out.stdout.strip().splitlines()[-1])
    import resource

    child_ru = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    assert held.sum() > 0
    assert child_peak < 600, child_peak  # python + numpy + lora_lab's import: well under 1.2 GB
    assert child_ru > child_peak  # what getrusage says of the same child (the inherited peak)
