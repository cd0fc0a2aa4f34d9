"""One weight's histogram next to the levels a quantization code can represent: pure torch + numpy.

A blockwise quantizer (see :mod:`lora_lab.core.quant`) stores each block of ``blocksize`` weights
as c_b · code[idx], with c_b = max |w| over the block and ``code`` a fixed set of points on
[−1, 1] (the 16 NF4 quantiles of N(0, 1), QLoRA §3; 16 FP4 values; 256 int8 values; 15 int4 levels).
So the values a *typical* block can hold are ``code × median_b(c_b)``; a weight between two of them
rounds to the nearer one.  :func:`histogram_with_levels` computes both in one pass:

    counts  = torch.histc(w, bins, min=min(w), max=max(w))        (bins,)   one O(numel) pass
    width   = (max(w) − min(w)) / bins          (1.0 when all weights are equal)
    centers = min(w) + width · (j + ½),  j = 0 … bins − 1
    scale   = median_b max_{w ∈ block b} |w|                      (blocks of ``blocksize``)
    levels  = code · scale                                        (len(code),)

so a 4096² weight (16M values) becomes ``bins`` numbers before anything is drawn
(:func:`lora_lab.viz.quant.weight_histogram` draws the record).  The code points themselves come
from the quantizer (:func:`lora_lab.hf.quant.roundtrip.code_points`);
:func:`lora_lab.hf.quant.roundtrip.weight_histogram_data` calls both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .quant import block_absmax

__all__ = ["WeightHistogram", "histogram_with_levels"]


@dataclass(frozen=True, eq=False)
class WeightHistogram:
    """A weight's value histogram and the quantization levels of a typical block.

    ``centers``: (bins,) float64 bin centres; ``width``: the common bin width; ``counts``: (bins,)
    weights per bin (float32, as ``torch.histc`` returns them; they sum to ``numel``).
    ``levels``: (len(code),) float64 code points × ``scale``, ascending; ``scale``: the median
    block absmax.  ``numel``: weights counted; ``scheme`` / ``blocksize`` / ``name``: labels.
    """

    centers: np.ndarray
    width: float
    counts: np.ndarray
    levels: np.ndarray
    scale: float
    numel: int
    scheme: str
    blocksize: int
    name: str = "weight"

    @property
    def edges(self) -> np.ndarray:
        """(bins + 1,) bin edges: centers − width/2, then the last centre + width/2."""
        return np.append(self.centers - self.width / 2, self.centers[-1] + self.width / 2)

    def __repr__(self) -> str:
        return (f"WeightHistogram({self.name}: {self.numel:,} weights in {len(self.counts)} "
                f"bins of width {self.width:.3g}, {len(self.levels)} {self.scheme} levels × median "
                f"absmax {self.scale:.3g} (blocksize {self.blocksize}))")

    def _repr_html_(self) -> str:
        return f"<b>{repr(self)}</b>"


def histogram_with_levels(weight: torch.Tensor, code: torch.Tensor, blocksize: int = 64,
                          bins: int = 200, *, scheme: str = "", name: str = "weight"
                          ) -> WeightHistogram:
    """The :class:`WeightHistogram` of ``weight`` (any shape, flattened, computed in fp32 where
    it lies) against ``code`` (the code points on [−1, 1]) scaled by the median absmax of the
    blocks of ``blocksize`` flattened weights.  See the module docstring for the formulas."""
    w = weight.detach().reshape(-1).float()
    lo, hi = w.min().item(), w.max().item()
    counts = torch.histc(w, bins=bins, min=lo, max=hi)
    width = (hi - lo) / bins or 1.0
    centers = lo + width * (torch.arange(bins, dtype=torch.float64) + 0.5)
    scale = block_absmax(w, blocksize).median().item()
    levels = (code.detach().cpu().double() * scale).numpy()
    return WeightHistogram(centers=centers.numpy(), width=width, counts=counts.cpu().numpy(),
                           levels=levels, scale=scale, numel=w.numel(), scheme=scheme,
                           blocksize=blocksize, name=name)
