"""Run one benchmark side in a fresh Python process and read back its result.

A side that measures peak memory or a first (compiling) step needs a process of its own: nothing
another side allocated or compiled may count.  The child is a ``python -c`` script that prints one
line ``__RESULT__<json>``; ``OMP_NUM_THREADS`` is the caller's (2 unless set), the same on every side.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def run_child(code: str, *args: str, **env: str) -> dict:
    """``python -c code *args`` with ``env`` added to the environment; the JSON after ``__RESULT__``."""
    full = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), **env)
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=full)
    line = [x for x in proc.stdout.splitlines() if x.startswith("__RESULT__")]
    if not line:
        raise SystemExit(f"child failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[0][len("__RESULT__"):])
