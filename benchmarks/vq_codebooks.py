"""Distortion of the vq method's shipped codebooks (docs/vq.md) on fresh standard normal values, beside the
scalar references at the same rate: sign × the optimal scale (1 − 2/π, 1 bit) and the 2-bit Lloyd–Max
quantizer (0.1175, Max 1960).

    .venv/bin/python benchmarks/vq_codebooks.py
"""

from __future__ import annotations

import argparse
import math

import torch

from onebit.methods.codebooks import SHIPPED, codebook

SIGN = 1 - 2 / math.pi
LLOYD_MAX_2BIT = 0.1175


def mse(dim: int, bits: int, values: int, seed: int) -> float:
    """Mean squared error per value of the nearest code, on ``values`` N(0, 1) values."""
    book = codebook(dim, bits).double()
    x = torch.randn(values // dim, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q = torch.cat([book[torch.cdist(x[i : i + 4096], book).argmin(1)] for i in range(0, len(x), 4096)])
    return float((x - q).square().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--values", type=int, default=50_000)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    print(f"| dim | bits | bits per weight | MSE on N(0, 1) | vs sign ({SIGN:.4f}) | vs 2-bit Lloyd–Max ({LLOYD_MAX_2BIT}) |")
    print("|---|---|---|---|---|---|")
    for dim, bits in SHIPPED:
        e = mse(dim, bits, args.values, args.seed)
        print(f"| {dim} | {bits} | {bits / dim:.3f} | {e:.4f} | {e / SIGN:.2f}× | {e / LLOYD_MAX_2BIT:.2f}× |")


if __name__ == "__main__":
    main()
