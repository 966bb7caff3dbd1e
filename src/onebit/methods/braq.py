"""BiLLM (``braq``): salient columns with 2-plane residual binarization, bell-shaped split of the rest.

Faithful to the reference code (billm.md §10): the searches run on the metric matrix T, candidate grids
k ∈ 1…49 and 81 quantiles, orders (1, 1, 2), per-row means. Stored per row per block: 7 fp16 floats
(salient μ, α₁, α₂; concentrated μ, α; sparse μ, α), two sign planes on salient columns and one elsewhere,
one group bit per non-salient weight, a B-bit column bitmap.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import PARAM_BITS, BlockContext, BlockResult, Bits, register
from .binarize import fit_group
from .salient import salient_columns, salient_metric, split_threshold


def braq_bits(n: int, b: int, k: int, floats_per_row: int) -> Bits:
    """Bits of one braq-style block: signs n·(B+k), group bits n·(B−k) + B column bits, fp16 floats."""
    return Bits(sign=n * (b + k), bitmap=n * (b - k) + b, params=n * floats_per_row * PARAM_BITS, weights=n * b)


@register("braq")
@dataclass
class Braq:
    salient_metric: str = "hessian"
    up_lim: int = 50

    def masks(self, w: Tensor, ctx: BlockContext) -> tuple[Tensor, Tensor, Tensor]:
        """(concentrated, sparse, salient) boolean n × B masks that partition the block."""
        t = salient_metric(w, ctx.d, self.salient_metric)
        cols = salient_columns(t, self.up_lim)
        conc, sparse = split_threshold(t, cols)
        return conc, sparse, cols.unsqueeze(0).expand_as(w)

    def quantize_block(self, w: Tensor, ctx: BlockContext) -> BlockResult:
        conc, sparse, sal = self.masks(w, ctx)
        fits = [fit_group(w, m, order) for m, order in ((conc, 1), (sparse, 1), (sal, 2))]
        q = sum(f.recon for f in fits)
        n, b = w.shape
        k = int(sal[0].sum())
        params = {
            "salient_cols": sal[0],
            "sparse_mask": sparse,
            "signs": sum(f.signs[0] * m for f, m in zip(fits, (conc, sparse, sal))),
            "signs2": fits[2].signs[1],
            "mu": torch.cat([f.mu for f in fits], 1),  # (n, 3): conc, sparse, salient
            "alpha": torch.cat([fits[0].alphas[0], fits[1].alphas[0], fits[2].alphas[0], fits[2].alphas[1]], 1),
        }
        return BlockResult(q, params, braq_bits(n, b, k, 7), {"salient_cols": k})
