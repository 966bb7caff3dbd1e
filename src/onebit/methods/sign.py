"""Baselines: ``sign`` (per-row mean + scale per block, the floor every method must beat) and
``identity`` (no quantization; checks that the engine's capture-and-replay is exact)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import PARAM_BITS, BlockContext, BlockResult, Bits, register
from .binarize import fit_group


@register("sign")
@dataclass
class Sign:
    def quantize_block(self, w: Tensor, ctx: BlockContext) -> BlockResult:
        fit = fit_group(w, torch.ones_like(w, dtype=torch.bool), 1)
        n, b = w.shape
        params = {"signs": fit.signs[0], "mu": fit.mu, "alpha": fit.alphas[0]}
        return BlockResult(fit.recon, params, Bits(sign=n * b, params=2 * n * PARAM_BITS, weights=n * b))


@register("identity")
@dataclass
class Identity:
    def quantize_block(self, w: Tensor, ctx: BlockContext) -> BlockResult:
        n, b = w.shape
        return BlockResult(w.clone(), {"weight": w}, Bits(params=n * b * 32, weights=n * b))
