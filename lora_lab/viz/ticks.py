"""Axis ticks whose labels are all different, for quantities that span little of their magnitude.

plotly's ``tickformat=".1~e"`` prints one significant digit, so a cosine schedule from 3e-3 that
has only decayed to 2.7e-3 shows "3e-3" on every tick.  :func:`distinct_ticks` picks "nice" tick
values (1, 2, 2.5 or 5 times a power of ten, as plotly and matplotlib do) across ``[lo, hi]`` and
writes them in scientific notation with the fewest mantissa digits that tell every tick apart::

    distinct_ticks(2.7e-3, 3e-3)  ->  [0.0027, 0.0028, 0.0029, 0.003],
                                      ["2.7e-3", "2.8e-3", "2.9e-3", "3.0e-3"]

(all labels share one exponent, so they read as one scale; between 0.1 and 9999 they are written
plainly, ``0.5``, ``1.0``).  Zero is written "0".
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["distinct_ticks"]

_NICE = (1.0, 2.0, 2.5, 5.0, 10.0)


def _nice_step(span: float, n: int) -> float:
    """The smallest nice step (1, 2, 2.5, 5 × 10^k) that covers ``span`` in at most ``n`` steps."""
    raw = span / max(n, 1)
    mag = 10.0 ** math.floor(math.log10(raw))
    return next(m * mag for m in _NICE if m * mag >= raw * (1 - 1e-9))


def _label(v: float, exp: int, digits: int) -> str:
    """``v`` as mantissa × 10^exp (``2.5e-3``), or plainly when ``exp`` is in [-1, 3]."""
    if v == 0:
        return "0"
    if -1 <= exp <= 3:
        return f"{v:.{max(digits - exp, 0)}f}"
    return f"{v / 10.0 ** exp:.{digits}f}e{exp}"


def distinct_ticks(lo: float, hi: float, n: int = 5) -> tuple[list[float], list[str]]:
    """About ``n`` tick values across ``[lo, hi]`` and their labels, all labels distinct.

    Returns ``(values, labels)``; empty lists when ``lo``/``hi`` are not finite.  When
    ``lo == hi`` (a constant learning rate) one tick is returned, labelled with 3 digits.
    """
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return [], []
    lo, hi = (float(lo), float(hi)) if lo <= hi else (float(hi), float(lo))
    big = max(abs(lo), abs(hi))
    if big == 0:
        return [0.0], ["0"]
    exp = math.floor(math.log10(big))
    if hi - lo <= big * 1e-12:
        return [hi], [_label(hi, exp, 2)]
    step = _nice_step(hi - lo, n)
    first = math.ceil(lo / step - 1e-9) * step
    values = [round(first + i * step, 15) for i in range(int((hi - first) / step + 1e-9) + 1)]
    values = [0.0 if abs(v) < step * 1e-9 else v for v in values]
    for digits in range(0, 16):      # the fewest digits that write every tick exactly, distinctly
        labels = [_label(v, exp, digits) for v in values]
        exact = all(abs(float(t) - v) <= step * 1e-6 for t, v in zip(labels, values))
        if exact and len(set(labels)) == len(labels):
            return values, labels
    return values, [repr(v) for v in values]  # not reached for finite, distinct values
