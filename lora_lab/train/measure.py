"""Measurement in one place: throughput and memory.

* Throughput is per second of *step* time (see :class:`StepTimer`), in two counts:
  ``tokens_per_s`` counts every non-padding token, prompts included (``attention_mask.sum()``:
  what the model computes on), ``supervised_tokens_per_s`` only those the loss is averaged over
  (labels ≠ -100 after the shift: what the model learns from).  With responses-only labels the
  second is often a small fraction of the first.
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

__all__ = ["rss_mb", "peak_rss_mb", "reset_peak_rss", "memory_mb", "StepTimer"]

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
    """The peak resident set size of this process so far, in MiB.

    On Linux, ``VmHWM`` from ``/proc/self/status``: ``getrusage``'s ``ru_maxrss`` keeps the peak of
    the process this one was exec'd from, so a run started from a large parent would report its
    parent's peak."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (_MB if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux
    except (ImportError, OSError):
        return None


def reset_peak_rss() -> bool:
    """Reset this process's peak (``VmHWM``) to its current RSS, so that :func:`peak_rss_mb` then
    reads the peak of what follows only.  Linux only (writes 5 to ``/proc/self/clear_refs``);
    returns False where that cannot be done."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def memory_mb(device: torch.device) -> dict[str, float | None]:
    """``{"rss_mb", "cuda_allocated_mb", "cuda_reserved_mb"}`` for ``device``."""
    out = {"rss_mb": rss_mb(), "cuda_allocated_mb": None, "cuda_reserved_mb": None}
    if device.type == "cuda":
        out["cuda_allocated_mb"] = torch.cuda.memory_allocated(device) / _MB
        out["cuda_reserved_mb"] = torch.cuda.memory_reserved(device) / _MB
    return out


class StepTimer:
    """Times each optimizer step alone, and the run.

    A step is timed from :meth:`begin` to :meth:`end`: loading its micro-batches, the forwards and
    backwards, clipping and the update.  Evaluations, checkpoint saves, callbacks (the dashboard's
    redraws) and pauses happen *between* steps and are not in any step's figure (they used to land
    in the next step's: a tiny model's ~4,000 tokens/s read ~120 right after each evaluation).
    :meth:`end` returns that step's ``(tokens / dt, supervised / dt)``.

    ``elapsed`` and :meth:`eta` are wall time (pauses excluded): the ETA, mean wall time per step ×
    steps left, includes the evaluations and saves, because they will come again.
    ``exclude(seconds)`` removes a pause; ``carry(seconds)`` adds the time of a resumed run.
    """

    def __init__(self):
        self.start = time.perf_counter()
        self._step_start: float | None = None
        self._excluded = 0.0
        self._carried = 0.0
        self.steps = 0
        self.step_s = 0.0  # seconds inside steps, this session

    def exclude(self, seconds: float) -> None:
        self._excluded += seconds

    def carry(self, seconds: float) -> None:
        self._carried += seconds

    def begin(self) -> None:
        """Mark the start of a step."""
        self._step_start = time.perf_counter()

    def end(self, tokens: int, supervised: int) -> tuple[float, float]:
        """Mark the end of the step begun last; return its (tokens/s, supervised tokens/s)."""
        dt = max(time.perf_counter() - self._step_start, 1e-9)
        self._step_start = None
        self.steps += 1
        self.step_s += dt
        return tokens / dt, supervised / dt

    @property
    def session(self) -> float:
        """Seconds of wall time in this call (pauses excluded)."""
        return time.perf_counter() - self.start - self._excluded

    @property
    def elapsed(self) -> float:
        """Seconds of wall time, including a resumed run's."""
        return self._carried + self.session

    def eta(self, steps_left: int) -> float | None:
        if self.steps == 0:
            return None
        return self.session / self.steps * max(steps_left, 0)
