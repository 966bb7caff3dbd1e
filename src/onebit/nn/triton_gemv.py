"""Triton packed GEMV for CUDA (the ``sign`` and ``braq`` layouts), reading the checkpoint's streams in place.

Each program takes ``BN`` rows and one token and walks the column blocks: it gathers the rows' sign bits
(and for braq the group and second-plane bits from their compact streams) for the block's columns, decodes
Ŵ in registers with the fp16 means and scales, and accumulates Ŵ·x. No dense weight ever exists in memory.
The compact streams (group bits of non-salient columns, second plane of salient ones) are addressed with
per-column ranks built once per module (4 bytes per input column).

Only imported where Triton exists; with ``TRITON_INTERPRET=1`` it runs on CPU tensors (how the tests check
it on machines without a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .kernels import TABLE_COLUMNS

_COL = {name: i for i, name in enumerate(TABLE_COLUMNS)}


@triton.jit
def _bit(bp, off):
    return ((tl.load(bp + (off >> 3)) >> (off & 7).to(tl.uint8)) & 1).to(tl.float32)


@triton.jit
def _coef(hp, off, d1, c, r0, nr, rr, live_r):
    """Column ``c`` of a row-wise (n × d1) fp16 tensor, for the program's rows, as a (BN, 1) column."""
    return tl.load(hp + off + r0 * d1 + c * nr + rr, mask=live_r, other=0.0).to(tl.float32)[:, None]


@triton.jit
def _gemv(x_ptr, bp, hp, tab, rank_ptr, y_ptr, n, m, nblk,
          LAYOUT: tl.constexpr, BN: tl.constexpr, BS: tl.constexpr, NCOL: tl.constexpr):
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    t = tl.program_id(1)
    live_r = rows < n
    r64 = rows.to(tl.int64)
    # row-wise tensors are stored in 16-row tiles, column-major inside a tile (formats/packed.py): element
    # (row, c) of an (n × d1) tensor at offset off sits at off + r0·d1 + c·R + (row − r0)
    r0 = (r64 // 16) * 16
    nr = tl.minimum(n - r0, 16)
    rr = r64 - r0
    acc = tl.zeros((BN,), dtype=tl.float32)
    for j in range(nblk):
        start = tl.load(tab + j * NCOL + 0)
        w = tl.load(tab + j * NCOL + 1)
        cols = tl.arange(0, BS)
        live_c = cols < w
        x = tl.load(x_ptr + t * m + start + cols, mask=live_c, other=0.0)
        live = live_r[:, None] & live_c[None, :]
        s1 = tl.load(tab + j * NCOL + 3) + (r0 * w + rr)[:, None] + cols[None, :] * nr[:, None]
        b1 = tl.where(live, _bit(bp, tl.where(live, s1, 0)), 0.0) * 2.0 - 1.0
        mu_off = tl.load(tab + j * NCOL + 7)
        al_off = tl.load(tab + j * NCOL + 8)
        if LAYOUT == 0:
            wq = _coef(hp, mu_off, 1, 0, r0, nr, rr, live_r) + _coef(hp, al_off, 1, 0, r0, nr, rr, live_r) * b1
        else:
            k = tl.load(tab + j * NCOL + 2)
            sal = _bit(bp, tl.load(tab + j * NCOL + 6) + tl.where(live_c, cols, 0)) > 0.5
            rank = tl.load(rank_ptr + start + cols, mask=live_c, other=0).to(tl.int64)
            sp_off = tl.load(tab + j * NCOL + 5) + (r0 * (w - k) + rr)[:, None] + rank[None, :] * nr[:, None]
            s2_off = tl.load(tab + j * NCOL + 4) + (r0 * k + rr)[:, None] + rank[None, :] * nr[:, None]
            sp = _bit(bp, tl.where(live & ~sal[None, :], sp_off, 0)) > 0.5
            b2 = _bit(bp, tl.where(live & sal[None, :], s2_off, 0)) * 2.0 - 1.0
            mc = _coef(hp, mu_off, 3, 0, r0, nr, rr, live_r)
            ms = _coef(hp, mu_off, 3, 1, r0, nr, rr, live_r)
            msal = _coef(hp, mu_off, 3, 2, r0, nr, rr, live_r)
            ac = _coef(hp, al_off, 4, 0, r0, nr, rr, live_r)
            a_s = _coef(hp, al_off, 4, 1, r0, nr, rr, live_r)
            a1 = _coef(hp, al_off, 4, 2, r0, nr, rr, live_r)
            a2 = _coef(hp, al_off, 4, 3, r0, nr, rr, live_r)
            ns = tl.where(sp, ms + a_s * b1, mc + ac * b1)
            wq = tl.where(sal[None, :], msal + a1 * b1 + a2 * b2, ns)
        acc += tl.sum(tl.where(live, wq * x[None, :], 0.0), axis=1)
    tl.store(y_ptr + t * n + rows, acc, mask=live_r)


def column_ranks(table: Tensor, bits: Tensor, in_features: int) -> Tensor:
    """int32 (in_features,): each column's rank among its block's non-salient columns if it is non-salient,
    among the salient ones if salient (the column's position in the compact ``sparse``/``signs2`` rows)."""
    from ..formats.bitpack import unpack_bits

    ranks = torch.zeros(in_features, dtype=torch.int32)
    bits = bits.cpu()
    for start, w, off in table[:, [_COL["start"], _COL["width"], _COL["salient_cols"]]].tolist():
        first = off // 8  # unpack only the bytes holding this block's column bitmap
        sal = unpack_bits(bits[first : (off + w + 7) // 8], (off + w) - 8 * first)[off - 8 * first :]
        ranks[start : start + w] = torch.where(sal, sal.cumsum(0) - 1, (~sal).cumsum(0) - 1).to(torch.int32)
    return ranks


def packed_gemm_triton(x: Tensor, bits: Tensor, fp16: Tensor, table: Tensor, ranks: Tensor, out_features: int,
                       layout: int, block_size: int, rows_per_program: int = 32) -> Tensor:
    """y (tokens, out) = x (tokens, in) · Ŵᵀ from the packed streams; all tensors on one device."""
    x = x.float().contiguous()
    tokens, m = x.shape
    y = torch.empty(tokens, out_features, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(out_features, rows_per_program), tokens)
    _gemv[grid](x, bits, fp16, table, ranks, y, out_features, m, table.shape[0], LAYOUT=layout,
                    BN=rows_per_program, BS=triton.next_power_of_2(block_size), NCOL=table.shape[1])
    return y
