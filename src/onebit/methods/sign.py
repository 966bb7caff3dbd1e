"""Baselines: ``sign`` (per-row mean + scale per block, the floor every method must beat) and
``identity`` (no quantization; checks that the engine's capture-and-replay is exact; not packable)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import PARAM_BITS, BlockContext, BlockResult, Bits, LevelFit, bits_to_signs, register, sign_plane_fit, signs_to_bits
from .binarize import decode_group, fit_group


@register("sign")
@dataclass
class Sign:
    """Stored form: ``signs`` (n × B), ``mu`` and ``alpha`` (n × 1 fp16)."""

    def quantize_block(self, w: Tensor, ctx: BlockContext) -> BlockResult:
        fit = fit_group(w, torch.ones_like(w, dtype=torch.bool), 1)
        n, b = w.shape
        params = {"signs": signs_to_bits(fit.signs[0]), "mu": fit.mu.half(), "alpha": fit.alphas[0].half()}
        q = self.decode_block(params, (n, b)).to(w.dtype)
        return BlockResult(q, params, Bits(sign=n * b, params=2 * n * PARAM_BITS, weights=n * b))

    def fit_block(self, w: Tensor, ctx: BlockContext) -> LevelFit:
        return sign_plane_fit(self, w, ctx, ("signs",))

    def decode_block(self, params: dict[str, Tensor], shape: tuple[int, int]) -> Tensor:
        ones = torch.ones(shape, dtype=torch.bool, device=params["signs"].device)
        return decode_group(params["mu"].float(), params["alpha"].float()[None], bits_to_signs(params["signs"])[None], ones)


@register("identity")
@dataclass
class Identity:
    def quantize_block(self, w: Tensor, ctx: BlockContext) -> BlockResult:
        n, b = w.shape
        return BlockResult(w.clone(), {"weight": w.clone()}, Bits(params=n * b * 32, weights=n * b))

    def fit_block(self, w: Tensor, ctx: BlockContext) -> "IdentityFit":
        return IdentityFit(self.quantize_block(w, ctx))

    def decode_block(self, params: dict[str, Tensor], shape: tuple[int, int]) -> Tensor:
        return params["weight"]


class IdentityFit:
    """Column fit that keeps every value as fed (column feedback then has nothing to correct)."""

    def __init__(self, base: BlockResult) -> None:
        self.base = base

    def assign(self, j: int, x: Tensor) -> Tensor:
        self.base.q[:, j] = x
        self.base.params["weight"][:, j] = x
        return x

    def result(self) -> BlockResult:
        return self.base
