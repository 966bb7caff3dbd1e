"""One-level Haar transform along one axis (HBLLM, hbllm.md §1).

Pairs are (even, odd) neighbours along ``dim``: L = c·(x_even + x_odd), H = c·(x_even − x_odd), and the
inverse x_even = c′·(L + H), x_odd = c′·(L − H). Default c = c′ = 1/√2: orthonormal, exact round trip, so
an error in the coefficients is the same error in the weights. ``compat`` uses the reference's fp16-rounded
inverse constant c′ = 0.70703125, which scales every reconstructed weight by 2·c·c′ ≈ 0.9998932.

Odd lengths are padded by repeating the last entry: the padded pair (x, x) has H = 0 exactly, so its high
coefficient is dropped rather than stored (the inverse puts the 0 back) and the pad entry is cropped. L has
⌈len/2⌉ entries and H ⌊len/2⌋: a transformed block has exactly as many coefficients as weights.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

C_EXACT = math.sqrt(0.5)
C_COMPAT_INVERSE = 0.70703125  # fp16(1/√2), the reference's inverse constant


def haar_forward(x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """(L, H) of ``x`` along ``dim`` (0 pairs rows, 1 pairs columns of a matrix)."""
    n = x.shape[dim]
    if n % 2:
        x = torch.cat([x, x.narrow(dim, n - 1, 1)], dim)
    even, odd = x.unflatten(dim, (-1, 2)).unbind(dim + 1)
    return (even + odd) * C_EXACT, ((even - odd) * C_EXACT).narrow(dim, 0, n // 2)


def haar_inverse(low: Tensor, high: Tensor, dim: int, compat: bool = False) -> Tensor:
    """Inverse of ``haar_forward``; the length along ``dim`` is ``len(L) + len(H)`` (odd: pad cropped)."""
    n = low.shape[dim] + high.shape[dim]
    if high.shape[dim] < low.shape[dim]:
        pad = list(high.shape)
        pad[dim] = 1
        high = torch.cat([high, high.new_zeros(pad)], dim)
    c = C_COMPAT_INVERSE if compat else C_EXACT
    return torch.stack([(low + high) * c, (low - high) * c], dim + 1).flatten(dim, dim + 1).narrow(dim, 0, n)
