"""Ternary baseline (``ternary``): values {−α, 0, +α} per row per block with one fp16 α — the value set of
llama.cpp's TQ1_0 / TQ2_0.

Per row the set of non-zero weights and α are the joint least-squares optimum: for a fixed set the best α is
the mean |w| over it, and the best set for any α is a top-k set of |w|, so with S_k the sum of the k largest
|w| the error Σw² − S_k²/k is minimised by the k maximizing S_k²/k. α is then rounded to fp16 and every
weight takes its nearest level (what column feedback does one column at a time).

Stored form: ``nonzero`` (n × B), ``signs`` (n × B, True = +), ``alpha`` (n × 1 fp16): 2 bits per weight +
16 per row per block (the bool convention). ``tq2_0`` and ``tq1_0`` (methods/ggml.py) are this fit on GGUF's
256-blocks, the latter stored base 3 as TQ1_0 packs it (1.6875 bpw).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .base import PARAM_BITS, BlockContext, BlockResult, Bits, LevelFit, register, to_storage


def ternary_scale(w: Tensor) -> Tensor:
    """Per-row least-squares α (n × 1, unrounded) of the best ternary approximation."""
    s = w.abs().sort(1, descending=True).values.cumsum(1)
    k = torch.arange(1, w.shape[1] + 1, device=w.device, dtype=w.dtype)
    best = (s.square() / k).argmax(1, keepdim=True)
    return s.gather(1, best) / (best + 1).to(w.dtype)


@register("ternary")
@dataclass
class Ternary:
    """{−α, 0, +α} per row per block (no options); column-wise error feedback by default (a baseline)."""

    default_feedback: ClassVar[str] = "column"

    def fit_block(self, w: Tensor, ctx: BlockContext) -> LevelFit:
        alpha = to_storage(ternary_scale(w))
        levels = torch.stack([-alpha, torch.zeros_like(alpha), alpha], -1)  # n × 1 × 3: codes 0, 1, 2
        base = BlockResult(torch.zeros_like(w), {}, self.bits(*w.shape))
        return LevelFit(self, base, levels, lambda codes: self.encode(codes, alpha.half()))

    def quantize_block(self, w: Tensor, ctx: BlockContext) -> BlockResult:
        return self.fit_block(w, ctx).assign_block(w)

    def bits(self, n: int, b: int) -> Bits:
        return Bits(sign=n * b, bitmap=n * b, params=n * PARAM_BITS, weights=n * b)

    def encode(self, codes: Tensor, alpha: Tensor) -> dict[str, Tensor]:
        """The stored form of codes 0, 1, 2 (= −α, 0, +α) and the fp16 α."""
        return {"nonzero": codes != 1, "signs": codes == 2, "alpha": alpha}

    def decode_block(self, params: dict[str, Tensor], shape: tuple[int, int]) -> Tensor:
        return params["alpha"].float() * torch.where(params["nonzero"], params["signs"].float() * 2 - 1, 0.0)
