"""Uniform k-bit baselines (``rtn``, ``gptq``): the ordinary 2/3/4/8-bit quantization a user would otherwise pick.

Per row per block (group = the engine's ``--blocksize``, so ``--blocksize 64`` is group 64) GPTQ's grid: with
x_min = min(w, 0), x_max = max(w, 0) (symmetric: x_max = max|w|, x_min = −x_max), scale s = (x_max − x_min) /
(2^k − 1) rounded to fp16, zero point z = round(−x_min / s) (k bits; symmetric: z = 2^(k−1), not stored);
q = clamp(round(x / s) + z, 0, 2^k − 1), x̂ = s·(q − z). ``rtn`` rounds every weight as it is (no error
feedback); ``gptq`` is the same grid with GPTQ's column-wise error feedback and static act-order (the engine's
``--feedback column --act-order``, both its defaults for this method).

Stored form: ``q0`` … ``q{k−1}`` (n × B bit planes of the codes, bit 0 first), ``scale`` (n × 1 fp16), and for
the asymmetric grid ``z0`` … ``z{k−1}`` (n × 1). Storage = k·n·B + 16·n [+ k·n] bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .base import PARAM_BITS, BlockContext, BlockResult, Bits, register, to_storage


def to_planes(codes: Tensor, k: int, prefix: str) -> dict[str, Tensor]:
    """Integer codes → k bool bit planes ``{prefix}0`` (bit 0) … ``{prefix}{k−1}``."""
    return {f"{prefix}{j}": (codes >> j) & 1 == 1 for j in range(k)}


def from_planes(params: dict[str, Tensor], k: int, prefix: str) -> Tensor:
    """Inverse of ``to_planes`` (long)."""
    return sum(params[f"{prefix}{j}"].long() << j for j in range(k))


@dataclass
class UniformGrid:
    """A fitted grid: per-row fp16-rounded ``scale`` and integer ``zero`` (n × 1), codes 0 … ``maxq``."""

    scale: Tensor
    zero: Tensor
    maxq: int

    @classmethod
    def fit(cls, w: Tensor, bits: int, sym: bool) -> "UniformGrid":
        maxq = 2**bits - 1
        xmin = w.min(1, keepdim=True).values.clamp_max(0)
        xmax = w.max(1, keepdim=True).values.clamp_min(0)
        if sym:
            xmax = torch.maximum(xmin.abs(), xmax)
            xmin = -xmax
        flat = (xmin == 0) & (xmax == 0)
        xmin, xmax = torch.where(flat, -1.0, xmin), torch.where(flat, 1.0, xmax)
        scale = to_storage((xmax - xmin) / maxq).clamp_min(2.0**-24)  # the smallest fp16 step: never 0
        zero = torch.full_like(scale, (maxq + 1) // 2) if sym else torch.round(-xmin / scale).clamp(0, maxq)
        return cls(scale, zero, maxq)

    def codes(self, x: Tensor) -> Tensor:
        """Nearest code of each value (x: n × c or n)."""
        s, z = (self.scale, self.zero) if x.dim() == 2 else (self.scale[:, 0], self.zero[:, 0])
        return torch.clamp(torch.round(x / s) + z, 0, self.maxq)

    def dequant(self, codes: Tensor) -> Tensor:
        s, z = (self.scale, self.zero) if codes.dim() == 2 else (self.scale[:, 0], self.zero[:, 0])
        return s * (codes - z)


@register("rtn")
@dataclass
class Uniform:
    """Round to nearest on a k-bit grid. Options: ``bits`` (2, 3, 4, 8), ``sym`` (symmetric grid, no zero)."""

    bits: int = 4
    sym: bool = False

    default_feedback: ClassVar[str] = "none"
    default_act_order: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4, 8):
            raise ValueError(f"{self.name}: bits must be 2, 3, 4 or 8, got {self.bits}")

    def _params(self, grid: UniformGrid, codes: Tensor) -> dict[str, Tensor]:
        params = to_planes(codes.long(), self.bits, "q")
        params["scale"] = grid.scale.half()
        if not self.sym:
            params.update(to_planes(grid.zero.long(), self.bits, "z"))
        return params

    def _result(self, grid: UniformGrid, codes: Tensor) -> BlockResult:
        n, b = codes.shape
        params = self._params(grid, codes)
        zero_bits = 0 if self.sym else self.bits * n
        bits = Bits(sign=self.bits * n * b, params=n * PARAM_BITS + zero_bits, weights=n * b)
        return BlockResult(grid.dequant(codes).to(grid.scale.dtype), params, bits)

    def quantize_block(self, w: Tensor, ctx: BlockContext) -> BlockResult:
        grid = UniformGrid.fit(w, self.bits, self.sym)
        return self._result(grid, grid.codes(w))

    def fit_block(self, w: Tensor, ctx: BlockContext) -> "UniformFit":
        return UniformFit(self, UniformGrid.fit(w, self.bits, self.sym), w.shape)

    def decode_block(self, params: dict[str, Tensor], shape: tuple[int, int]) -> Tensor:
        scale = params["scale"].float()
        zero = torch.full_like(scale, 2 ** (self.bits - 1)) if self.sym else from_planes(params, self.bits, "z").float()
        return scale * (from_planes(params, self.bits, "q").float() - zero)


@register("gptq")
@dataclass
class Gptq(Uniform):
    """GPTQ: ``rtn``'s grid with column-wise error feedback and static act-order (the engine's defaults here)."""

    default_feedback: ClassVar[str] = "column"
    default_act_order: ClassVar[bool] = True


class UniformFit:
    """Column fit on a fixed grid: each column rounded to its nearest code."""

    def __init__(self, method: Uniform, grid: UniformGrid, shape: torch.Size) -> None:
        self.method, self.grid = method, grid
        self.codes = torch.zeros(shape, dtype=grid.scale.dtype, device=grid.scale.device)

    def assign(self, j: int, x: Tensor) -> Tensor:
        c = self.grid.codes(x)
        self.codes[:, j] = c
        return self.grid.dequant(c)

    def result(self) -> BlockResult:
        return self.method._result(self.grid, self.codes)
