"""The CPU heap under torch's tensors: glibc's malloc, the settings training wants, and trimming.

On CPU, torch allocates tensors with the C library's ``malloc``.  glibc serves a request of at
least the *mmap threshold* with its own ``mmap`` (handed back to the OS when freed) and smaller
ones from its heap, and gives the heap's free top back to the OS (``brk``) once it exceeds the
*trim threshold*.  Both thresholds start at 128 KiB and move with the allocations seen (the mmap
threshold rises to the size of a freed mapped block, up to 32 MiB; the trim threshold follows at
twice it: ``mallopt(3)``).

A training step allocates and frees the same tens of MB each step.  Whether glibc keeps them or
returns them and faults them back in (zeroed, 4 KiB at a time) depends on the order of the
allocations before, so two loops doing the same work can differ: measured here on
``builtin:tiny`` (LoRA r=8, batch 8×128, fused AdamW), ``lora_lab.train`` faulted 3,359 pages a
step and a plain loop 676, and ran 0.83-0.93× as fast; with the thresholds fixed at the values
below for both, 30-50 faults a step and 1.01× (``benchmarks/train_overhead.py``).

:func:`steady_heap` fixes the thresholds at the values glibc's own rule reaches at most (mmap 32
MiB, trim 64 MiB), so a run starts where a long one ends; blocks of 32 MiB and more are still
mapped and returned on free.  It changes nothing when the user chose (``MALLOC_*`` environment
variables, or another allocator through ``LD_PRELOAD``) or without glibc.  :func:`trim` hands the
heap's free memory back now (``malloc_trim(0)``), for the end of a run and between the chunks of
a quantization scan.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

__all__ = ["steady_heap", "trim"]

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD = 32 << 20                  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD        # what glibc's dynamic rule sets with it
_USER_KNOBS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_",
               "MALLOC_MMAP_MAX_", "GLIBC_TUNABLES", "LD_PRELOAD")


@functools.cache
def _libc():
    """glibc, or None (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018  (both exist in glibc only)
        return libc
    except (OSError, AttributeError):
        return None


@functools.cache
def steady_heap() -> bool:
    """Fix glibc's mmap and trim thresholds for training (module docstring), once per process.

    Returns True when they were set, False when left alone: no glibc, or the user tuned the
    allocator (one of ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TOP_PAD_``,
    ``MALLOC_MMAP_MAX_``, ``GLIBC_TUNABLES``, ``LD_PRELOAD`` is set)."""
    libc = _libc()
    if libc is None or any(os.environ.get(k) for k in _USER_KNOBS):
        return False
    # mmap first: setting either turns glibc's dynamic rule off, and a trim threshold alone would
    # leave the mmap threshold at 128 KiB, mapping (and faulting in) every activation each step
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def trim() -> bool:
    """Give the heap's free memory back to the OS now (``malloc_trim(0)``); False without glibc."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
