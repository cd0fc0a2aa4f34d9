"""Storage of quantized weights, no training: fp16 bytes against bytes at b bits per weight.

:func:`quant_storage` sums, over tensors t with n_t weights stored at b_t bits per parameter (codes
plus block constants, see :func:`lora_lab.core.quant.bits_per_param`), ``fp16 = 2·Σ n_t`` bytes
against ``quant = Σ n_t·b_t / 8`` bytes, into a :class:`QuantStorage`.  (Re-exported by
:mod:`lora_lab.core.memory`, its former home.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["QuantStorage", "quant_storage"]


@dataclass(frozen=True)
class QuantStorage:
    """Bytes of a set of weights at fp16 and in a quantized scheme (:func:`quant_storage`).

    ``numel`` = Σ n_t weights; ``fp16_bytes`` = 2·Σ n_t; ``quant_bytes`` = Σ n_t·b_t / 8 (b_t: bits
    per parameter of tensor t, block constants included); ``saved_bytes`` = fp16 − quant;
    ``saved_share`` = saved / fp16 (0 for no weights).  ``record["fp16_bytes"]`` reads a field too
    (the dict this record replaced).
    """

    numel: int
    fp16_bytes: float
    quant_bytes: float
    saved_bytes: float
    saved_share: float

    @property
    def bits_per_param(self) -> float:
        """Mean storage bits per weight, Σ n_t·b_t / Σ n_t (0 for no weights)."""
        return 8 * self.quant_bytes / max(self.numel, 1)

    def __getitem__(self, field: str) -> float:
        if field not in self.__dataclass_fields__:
            raise KeyError(field)
        return getattr(self, field)

    def __repr__(self) -> str:
        mib = 2**20
        return (f"QuantStorage({self.numel:,} weights: {self.fp16_bytes / mib:.2f} MiB at fp16 → "
                f"{self.quant_bytes / mib:.2f} MiB at {self.bits_per_param:.3f} bits/param, saves "
                f"{self.saved_bytes / mib:.2f} MiB ({self.saved_share:.1%}))")

    def _repr_html_(self) -> str:
        return f"<b>{self!r}</b>"


def quant_storage(numels: Sequence[int], bits_per_param: Sequence[float]) -> QuantStorage:
    """:class:`QuantStorage` of tensors with ``numels[t]`` weights stored at ``bits_per_param[t]``
    bits each (e.g. the ``numel`` and ``bits_per_param`` columns of a
    :class:`~lora_lab.hf.quant.scan.QuantScan` table).  Sizes in bytes (the repr shows MiB)."""
    n = np.asarray(numels, dtype=np.int64)
    fp16 = 2.0 * float(n.sum())
    quant = float((n * np.asarray(bits_per_param, dtype=float)).sum()) / 8
    saved = fp16 - quant
    return QuantStorage(numel=int(n.sum()), fp16_bytes=fp16, quant_bytes=quant, saved_bytes=saved,
                        saved_share=saved / fp16 if fp16 else 0.0)
