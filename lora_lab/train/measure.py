"""Measurement in one place: throughput and memory.

* Throughput counts non-padding tokens (``attention_mask.sum()``) per second of wall time.
* Memory on a GPU is what the CUDA caching allocator reports: ``allocated`` (live tensors) and
  ``reserved`` (held by the allocator; what ``nvidia-smi`` sees, minus the context).  On CPU it is
  the process resident set size (RSS), read from ``/proc/self/statm`` (or psutil elsewhere), and
  the peak RSS from ``getrusage``.
"""

from __future__ import annotations

import os
import sys
import time

import torch

__all__ = ["rss_mb", "peak_rss_mb", "memory_mb", "StepTimer"]

_MB = 1024 * 1024


def rss_mb() -> float | None:
    """The resident set size of this process, in MiB (None when it cannot be read)."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / _MB
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return psutil.Process().memory_info().rss / _MB
    except Exception:  # noqa: BLE001  (memory is a nicety; never fail training for it)
        return None


def peak_rss_mb() -> float | None:
    """The peak resident set size of this process so far, in MiB."""
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (_MB if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux
    except (ImportError, OSError):
        return None


def memory_mb(device: torch.device) -> dict[str, float | None]:
    """``{"rss_mb", "cuda_allocated_mb", "cuda_reserved_mb"}`` for ``device``."""
    out = {"rss_mb": rss_mb(), "cuda_allocated_mb": None, "cuda_reserved_mb": None}
    if device.type == "cuda":
        out["cuda_allocated_mb"] = torch.cuda.memory_allocated(device) / _MB
        out["cuda_reserved_mb"] = torch.cuda.memory_reserved(device) / _MB
    return out


class StepTimer:
    """Times steps: tokens/s of the last step, total elapsed time and an ETA.

    Paused time is excluded (``exclude(seconds)``) so that a pause does not inflate the ETA;
    ``carry(seconds)`` adds the time of the run being resumed to ``elapsed``.
    """

    def __init__(self):
        self.start = time.perf_counter()
        self._last = self.start
        self._excluded = 0.0
        self._carried = 0.0
        self.steps = 0

    def exclude(self, seconds: float) -> None:
        self._excluded += seconds
        self._last += seconds

    def carry(self, seconds: float) -> None:
        self._carried += seconds

    def lap(self, tokens: int) -> float:
        """Mark the end of a step of ``tokens`` tokens; return its tokens/s."""
        now = time.perf_counter()
        dt = max(now - self._last, 1e-9)
        self._last = now
        self.steps += 1
        return tokens / dt

    @property
    def session(self) -> float:
        """Seconds spent training in this call (pauses excluded)."""
        return time.perf_counter() - self.start - self._excluded

    @property
    def elapsed(self) -> float:
        """Seconds spent training, including a resumed run's."""
        return self._carried + self.session

    def eta(self, steps_left: int) -> float | None:
        if self.steps == 0:
            return None
        return self.session / self.steps * max(steps_left, 0)
