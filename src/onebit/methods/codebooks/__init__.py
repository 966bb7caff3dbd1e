"""The vector codebooks of the ``vq`` method: format constants, like llama.cpp's IQ grids.

A codebook ``d{dim}k{bits}.bin`` holds 2^bits code vectors of ``dim`` entries (fp16, little-endian, row
after row), the centres of a Lloyd (k-means) fit to the standard normal distribution: after the rotation
pre-pass a row's weights divided by their RMS are close to N(0, 1). The decoder reads the codebook from the
installed package, so it costs no stored bits; ``python -m onebit.methods.codebooks`` rewrites the files
with ``train`` (float64, seeded: the same numbers on the same build of PyTorch).
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

HERE = Path(__file__).parent
SHIPPED = [(8, 8), (8, 9), (8, 10), (8, 11), (8, 12), (4, 6), (4, 7), (4, 8)]
"""(dim, bits) of every shipped codebook: 1.0 … 1.5 bits per weight in 8 dimensions, 1.5 … 2.0 in 4."""


@functools.cache
def codebook(dim: int, bits: int) -> Tensor:
    """The shipped (2^bits × dim) float32 codebook (fp16 values)."""
    path = HERE / f"d{dim}k{bits}.bin"
    if not path.exists():
        have = ", ".join(f"dim {d} bits {k}" for d, k in SHIPPED)
        raise ValueError(f"vq: no codebook for dim {dim}, {bits} bits (shipped: {have})")
    raw = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.float16)
    if raw.numel() != dim << bits:
        raise ValueError(f"vq: {path} holds {raw.numel()} values, expected {dim << bits}")
    return raw.reshape(1 << bits, dim).float()


def train(dim: int, bits: int, per_centre: int = 64, iters: int = 25, seed: int = 0) -> Tensor:
    """Lloyd's algorithm on ``per_centre`` · 2^bits standard normal samples (float64), started from the first
    2^bits samples; an empty cell keeps its centre. Returns fp16 centres sorted by (norm, then entries)."""
    k = 1 << bits
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(per_centre * k, dim, generator=g, dtype=torch.float64)
    c = x[:k].clone()
    for _ in range(iters):
        idx = torch.cat([nearest(x[i : i + 65536], c) for i in range(0, len(x), 65536)])
        total = torch.zeros_like(c).index_add_(0, idx, x)
        count = torch.bincount(idx, minlength=k).to(x.dtype)
        c = torch.where(count[:, None] > 0, total / count.clamp_min(1)[:, None], c)
    c = c.half()
    order = sorted(range(k), key=lambda i: (float(c[i].float().norm()), c[i].tolist()))
    return c[order]


def nearest(x: Tensor, c: Tensor) -> Tensor:
    """Index of the nearest centre (Euclidean) of each row of x."""
    return (c.square().sum(1) - 2 * x @ c.T).argmin(1)


def main() -> None:
    for dim, bits in SHIPPED:
        t = time.time()
        c = train(dim, bits)
        (HERE / f"d{dim}k{bits}.bin").write_bytes(c.numpy().astype("<f2").tobytes())
        print(f"d{dim}k{bits}: {bits / dim:.3f} bits per weight, {time.time() - t:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
