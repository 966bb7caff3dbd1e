"""Bit packing, LSB-first: bit ``j % 8`` of byte ``j // 8`` holds element ``j`` (the llama.cpp Q1_0 / HQQ
order), so a run of 128 bits along in_features is 16 contiguous bytes."""

from __future__ import annotations

import torch
from torch import Tensor

_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def packed_nbytes(nbits: int) -> int:
    return (nbits + 7) // 8


def pack_bits(bits: Tensor) -> Tensor:
    """bool tensor (any shape) → uint8 vector of ``ceil(numel / 8)`` bytes, flattened row-major, LSB-first."""
    if bits.dtype != torch.bool:
        raise TypeError(f"pack_bits expects a bool tensor, got {bits.dtype}")
    flat = bits.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8).to(torch.uint8) * _WEIGHTS.to(flat.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, nbits: int) -> Tensor:
    """uint8 vector → bool vector of the first ``nbits`` bits (inverse of ``pack_bits``)."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_bits expects uint8, got {packed.dtype}")
    if packed.numel() * 8 < nbits:
        raise ValueError(f"{packed.numel()} bytes hold {packed.numel() * 8} bits, {nbits} requested")
    w = _WEIGHTS.to(packed.device)
    return ((packed.reshape(-1, 1) & w) != 0).reshape(-1)[:nbits]


def pack_rows(bits: Tensor) -> Tensor:
    """bool (n, m) → uint8 (n, ceil(m / 8)): each row packed on its own (rows start on a byte)."""
    n, m = bits.shape
    pad = (-m) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(n, pad)], 1)
    return pack_bits(bits).view(n, -1)


def unpack_rows(packed: Tensor, m: int) -> Tensor:
    """uint8 (n, ceil(m / 8)) → bool (n, m)."""
    n = packed.shape[0]
    return unpack_bits(packed.reshape(-1), packed.numel() * 8).view(n, -1)[:, :m]
