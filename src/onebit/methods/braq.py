"""BiLLM (``braq``): salient columns with 2-plane residual binarization, bell-shaped split of the rest.

Faithful to the reference code (billm.md §10): the searches run on the metric matrix T, candidate grids
k ∈ 1…49 and 81 quantiles, orders (1, 1, 2), per-row means.

Stored form of a block (n × B, k salient columns), see ``BlockResult``:
``salient_cols`` (B bits), ``signs`` (n × B, first plane), ``signs2`` (n × k, second plane on salient
columns), ``sparse`` (n × (B−k) group bits on the non-salient columns, True = sparse), ``mu`` (n × 3 fp16:
concentrated, sparse, salient μ₁+μ₂), ``alpha`` (n × 4 fp16: concentrated, sparse, salient α₁, α₂).
Storage = B + n·(B+k) + n·(B−k) + 7·16·n bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import PARAM_BITS, BlockContext, BlockResult, Bits, LevelFit, bits_to_signs, register, sign_plane_fit, signs_to_bits
from .binarize import decode_group, fit_group
from .salient import salient_columns, salient_metric, split_threshold


def braq_bits(n: int, b: int, k: int, floats_per_row: int) -> Bits:
    """Bits of one braq-style block: signs n·(B+k), group bits n·(B−k) + B column bits, fp16 floats."""
    return Bits(sign=n * (b + k), bitmap=n * (b - k) + b, params=n * floats_per_row * PARAM_BITS, weights=n * b)


def braq_decode(params: dict[str, Tensor], shape: tuple[int, int]) -> Tensor:
    """Dequantize a braq-layout block (also used by methods that share the layout)."""
    cols = params["salient_cols"]
    sal = cols.unsqueeze(0).expand(shape)
    sparse = torch.zeros(shape, dtype=torch.bool, device=cols.device)
    sparse[:, ~cols] = params["sparse"]
    conc = ~sal & ~sparse
    s1 = bits_to_signs(params["signs"])
    s2 = torch.zeros(shape, device=cols.device)
    s2[:, cols] = bits_to_signs(params["signs2"])
    mu, alpha = params["mu"].float(), params["alpha"].float()
    return (
        decode_group(mu[:, 0:1], alpha[None, :, 0:1], s1[None], conc)
        + decode_group(mu[:, 1:2], alpha[None, :, 1:2], s1[None], sparse)
        + decode_group(mu[:, 2:3], torch.stack([alpha[:, 2:3], alpha[:, 3:4]]), torch.stack([s1, s2]), sal)
    )


@register("braq")
@dataclass
class Braq:
    """``proxy_order``: order of the non-salient remainder in the column-count search's error proxy
    (BiLLM 2; DBellQuant's release 1, its only change to the binarizer: ``--recipe dbellquant``)."""

    salient_metric: str = "hessian"
    up_lim: int = 50
    proxy_order: int = 2

    def __post_init__(self) -> None:
        if self.proxy_order not in (1, 2):
            raise ValueError(f"braq: proxy_order must be 1 or 2, got {self.proxy_order}")

    def masks(self, w: Tensor, ctx: BlockContext) -> tuple[Tensor, Tensor, Tensor]:
        """(concentrated, sparse, salient) boolean n × B masks that partition the block."""
        t = salient_metric(w, ctx.d, self.salient_metric)
        cols = salient_columns(t, self.up_lim, self.proxy_order)
        conc, sparse = split_threshold(t, cols)
        return conc, sparse, cols.unsqueeze(0).expand_as(w)

    def quantize_block(self, w: Tensor, ctx: BlockContext) -> BlockResult:
        conc, sparse, sal = self.masks(w, ctx)
        fc, fs, fsal = (fit_group(w, m, order) for m, order in ((conc, 1), (sparse, 1), (sal, 2)))
        cols = sal[0]
        signs = fc.signs[0] * conc + fs.signs[0] * sparse + fsal.signs[0] * sal
        params = {
            "salient_cols": cols.clone(),
            "signs": signs_to_bits(signs),
            "signs2": signs_to_bits(fsal.signs[1][:, cols]),
            "sparse": sparse[:, ~cols].clone(),
            "mu": torch.cat([fc.mu, fs.mu, fsal.mu], 1).to(torch.float16),
            "alpha": torch.cat([fc.alphas[0], fs.alphas[0], fsal.alphas[0], fsal.alphas[1]], 1).to(torch.float16),
        }
        n, b = w.shape
        k = int(cols.sum())
        return BlockResult(self.decode_block(params, (n, b)).to(w.dtype), params, braq_bits(n, b, k, 7), {"salient_cols": k})

    def fit_block(self, w: Tensor, ctx: BlockContext) -> LevelFit:
        """Column feedback: this block's masks and parameters, both sign planes re-assigned per column."""
        return sign_plane_fit(self, w, ctx, ("signs", "signs2"))

    def decode_block(self, params: dict[str, Tensor], shape: tuple[int, int]) -> Tensor:
        return braq_decode(params, shape)
