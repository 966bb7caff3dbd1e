"""Methods whose stored form is a llama.cpp (GGML) block type, so a run exports to GGUF with no loss.

Each fixes its block size (``block_size``: the type's, along the input dimension as GGUF lays it out) and
names its GGUF type (``gguf_type``) and the method that takes over where its block does not divide a row
(``fallback``: llama.cpp's quantizer falls back from Q2_K/TQ1_0/TQ2_0 to Q4_0, from 32-blocks to F16).
Parameters are rounded as the type stores them (fp16 d, 4-bit sub-scales) before the weights are formed, so
the engine's error feedback sees what llama.cpp decodes; column feedback is the default (a calibrated GPTQ).
``formats.ggml`` turns each stored form into the type's bytes. Bits per weight, stored = in the GGUF file:

* ``q1_0``  (128): fp16 d, sign bits; w = ±d.                                   1.125
* ``tq2_0`` (256): fp16 d, 2-bit trits; w = d·{−1, 0, +1} (``ternary``'s fit).  2.0625
* ``tq1_0`` (256): the same values, trits packed base 3 (5 per byte).           1.6875
* ``q2_k``  (256): fp16 d, dmin; per 16 weights 4-bit scale s and min m;
  w = d·s·q − dmin·m, q ∈ 0..3.                                                 2.625
* ``q4_0`` / ``q8_0`` (32): fp16 d, w = d·(q − 8), q ∈ 0..15 / w = d·q, q ∈ −128..127 (``rtn``'s
  symmetric grid).                                                              4.5 / 8.5
* ``f16``: the weights in fp16 (the last fallback; any block).                  16
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .base import PARAM_BITS, BlockContext, BlockResult, Bits, LevelFit, register, to_storage
from .ternary import Ternary
from .uniform import Uniform, from_planes, to_planes


@register("q1_0")
@dataclass
class Q1_0:
    """Sign bits and one fp16 d per 128 weights: d = mean |w| (the L2 optimum for the signs of w), rounded to
    fp16 first; each weight then takes the nearer of ±d."""

    block_size: ClassVar[int] = 128
    gguf_type: ClassVar[str] = "Q1_0"
    fallback: ClassVar[str] = "q4_0"
    default_feedback: ClassVar[str] = "column"

    def fit_block(self, w: Tensor, ctx: BlockContext) -> LevelFit:
        n, b = w.shape
        d = to_storage(w.abs().mean(1, keepdim=True))
        base = BlockResult(torch.zeros_like(w), {}, Bits(sign=n * b, params=n * PARAM_BITS, weights=n * b))
        return LevelFit(self, base, torch.stack([-d, d], -1), lambda codes: {"signs": codes == 1, "d": d.half()})

    def quantize_block(self, w: Tensor, ctx: BlockContext) -> BlockResult:
        return self.fit_block(w, ctx).assign_block(w)

    def decode_block(self, params: dict[str, Tensor], shape: tuple[int, int]) -> Tensor:
        return params["d"].float() * (params["signs"].float() * 2 - 1)


@register("tq2_0")
@dataclass
class TQ2_0(Ternary):
    """``ternary`` on TQ2_0's 256-blocks (its stored form is TQ2_0's: 2 bits per trit and fp16 d)."""

    block_size: ClassVar[int] = 256
    gguf_type: ClassVar[str] = "TQ2_0"
    fallback: ClassVar[str] = "q4_0"


# TQ1_0's trit layout (ggml): codes c = value + 1 ∈ {0, 1, 2}; bytes 0–31 hold elements k·32 + j (k = 0..4),
# bytes 32–47 elements 160 + k·16 + j, five trits each; bytes 48–51 elements 240 + k·4 + j, four each. A byte
# is ⌈x·256/243⌉ for x = Σ_k c_k·3^(4−k); trit k reads back as ((byte·3^k mod 256)·3) >> 8.
TRIT_SEGMENTS = ((0, 32, 5), (160, 16, 5), (240, 4, 4))  # (first element, bytes, trits per byte)
TRIT_BYTES = 52


def pack_trits(codes: Tensor) -> Tensor:
    """(n, 256) codes 0..2 → (n, 52) TQ1_0 bytes (long)."""
    n, parts = codes.shape[0], []
    for start, nbytes, k in TRIT_SEGMENTS:
        seg = codes[:, start : start + nbytes * k].reshape(n, k, nbytes)
        pw = 3 ** torch.arange(4, 4 - k, -1, device=codes.device)
        parts.append(((seg * pw[:, None]).sum(1) * 256 + 242) // 243)
    return torch.cat(parts, 1)


def unpack_trits(packed: Tensor) -> Tensor:
    """Inverse of ``pack_trits``: (n, 52) bytes → (n, 256) codes 0..2 (long)."""
    n, parts, off = packed.shape[0], [], 0
    for _, nbytes, k in TRIT_SEGMENTS:
        seg = packed[:, off : off + nbytes, None].long()
        off += nbytes
        mult = 3 ** torch.arange(k, device=packed.device)
        parts.append((((seg * mult) & 0xFF) * 3 >> 8).transpose(1, 2).reshape(n, k * nbytes))
    return torch.cat(parts, 1)


@register("tq1_0")
@dataclass
class TQ1_0(Ternary):
    """``ternary`` on TQ1_0's 256-blocks, stored as TQ1_0 stores it: 52 bytes of base-3 trits (as 8 bit
    planes ``t0``…``t7``) and fp16 α — 1.6875 bpw in onebit's checkpoint as in the GGUF file."""

    block_size: ClassVar[int] = 256
    gguf_type: ClassVar[str] = "TQ1_0"
    fallback: ClassVar[str] = "q4_0"

    def bits(self, n: int, b: int) -> Bits:
        """One sign-like bit per weight, the rest of the base-3 code as bitmap bits."""
        return Bits(sign=n * b, bitmap=n * (8 * TRIT_BYTES - b), params=n * PARAM_BITS, weights=n * b)

    def encode(self, codes: Tensor, alpha: Tensor) -> dict[str, Tensor]:
        return {**to_planes(pack_trits(codes), 8, "t"), "alpha": alpha}

    def decode_block(self, params: dict[str, Tensor], shape: tuple[int, int]) -> Tensor:
        return params["alpha"].float() * (unpack_trits(from_planes(params, 8, "t")) - 1).float()


def fit_scale_min(x: Tensor, weight: Tensor, nmax: int, rmin: float, rdelta: float, nstep: int) -> tuple[Tensor, Tensor]:
    """x ≈ scale·L − m with L ∈ 0..nmax, m ≥ 0, per group (last dim), minimising Σ weight·err²: llama.cpp's
    make_qkx2/qkx3 search (grids with inverse scales (nmax + rmin + rdelta·i)/(max − min), i = 0..nstep, each
    refitted by weighted least squares), vectorized. Returns (scale, m), each of shape x.shape[:-1]."""
    lo = x.min(-1, keepdim=True).values.clamp_max(0)
    rng = x.max(-1, keepdim=True).values - lo
    flat = rng <= 0
    rng = torch.where(flat, 1.0, rng)
    sw, sx = weight.sum(-1, keepdim=True), (weight * x).sum(-1, keepdim=True)

    def err(scale: Tensor, mn: Tensor, L: Tensor) -> Tensor:
        return (weight * (scale * L + mn - x).square()).sum(-1, keepdim=True)

    L = (nmax / rng * (x - lo)).round().clamp(0, nmax)
    scale, mn = rng / nmax, lo
    best = err(scale, mn, L)
    for i in range(nstep + 1):
        L = ((nmax + rmin + rdelta * i) / rng * (x - lo)).round().clamp(0, nmax)
        sl, sl2, sxl = (weight * L).sum(-1, keepdim=True), (weight * L * L).sum(-1, keepdim=True), (weight * L * x).sum(-1, keepdim=True)
        det = sw * sl2 - sl * sl
        ok = det > 0
        det = torch.where(ok, det, 1.0)
        s, m = (sw * sxl - sx * sl) / det, (sl2 * sx - sl * sxl) / det
        s = torch.where(m > 0, sxl / sl2.clamp_min(1e-30), s)  # a positive offset is not representable: m = 0
        m = m.clamp_max(0)
        e = err(s, m, L)
        better = ok & (e < best)
        best, scale, mn = torch.where(better, e, best), torch.where(better, s, scale), torch.where(better, m, mn)
    scale, mn = torch.where(flat, 0.0, scale), torch.where(flat, lo, mn)
    return scale[..., 0], -mn[..., 0]


def quantize_scales(v: Tensor, levels: int = 15) -> tuple[Tensor, Tensor]:
    """Per row, 4-bit codes c and an fp16 step d with d·c ≈ v (v ≥ 0, n × g): d = max v / 15 (as Q2_K)."""
    top = v.max(1, keepdim=True).values
    pos = top > 0
    codes = torch.where(pos, (levels / torch.where(pos, top, 1.0) * v).round().clamp(0, levels), 0.0)
    return codes.long(), to_storage(torch.where(pos, top / levels, 0.0))


@register("q2_k")
@dataclass
class Q2_K:
    """llama.cpp Q2_K: per 16 weights a 4-bit scale and min, per 256 fp16 d and dmin; w = d·s·q − dmin·m.
    Scales and mins are searched as llama.cpp does with an importance matrix (imatrix = diag H here, weight
    diag(H)_j·√(σ² + w_j²), squared error), then quantized to 4 bits; each weight takes its nearest level."""

    block_size: ClassVar[int] = 256
    gguf_type: ClassVar[str] = "Q2_K"
    fallback: ClassVar[str] = "q4_0"
    default_feedback: ClassVar[str] = "column"
    sub: ClassVar[int] = 16

    def fit_block(self, w: Tensor, ctx: BlockContext) -> LevelFit:
        n, b = w.shape
        x = w.reshape(n, b // self.sub, self.sub)
        sigma2 = w.square().mean(1).view(n, 1, 1)
        weight = torch.diag(ctx.h).to(w).view(1, *x.shape[1:]) * (sigma2 + x.square()).sqrt()
        scale, mins = fit_scale_min(x, weight, 3, -0.9, 0.05, 36)
        (sc, d), (m, dmin) = quantize_scales(scale), quantize_scales(mins)
        params = {**to_planes(sc, 4, "s"), **to_planes(m, 4, "m"), "d": d.half(), "dmin": dmin.half()}
        levels = self.values(params, torch.arange(4, device=w.device, dtype=w.dtype))
        bits = Bits(sign=2 * n * b, params=n * (2 * PARAM_BITS + 8 * b // self.sub), weights=n * b)
        base = BlockResult(torch.zeros_like(w), {}, bits)
        return LevelFit(self, base, levels, lambda codes: {**to_planes(codes, 2, "q"), **params})

    def quantize_block(self, w: Tensor, ctx: BlockContext) -> BlockResult:
        return self.fit_block(w, ctx).assign_block(w)

    def values(self, params: dict[str, Tensor], q: Tensor) -> Tensor:
        """d·s·q − dmin·m in fp32 as ggml computes it; ``q``: codes (n × B) or candidate codes (L,) → n × B × L."""
        dl = (params["d"].float() * from_planes(params, 4, "s").float()).repeat_interleave(self.sub, 1)
        ml = (params["dmin"].float() * from_planes(params, 4, "m").float()).repeat_interleave(self.sub, 1)
        if q.dim() == 1:
            dl, ml = dl[..., None], ml[..., None]
        return dl * q - ml

    def decode_block(self, params: dict[str, Tensor], shape: tuple[int, int]) -> Tensor:
        return self.values(params, from_planes(params, 2, "q").float())


@dataclass
class UniformType:
    """A GGUF type whose values are ``rtn``'s symmetric grid: w = d·(q − 2^(k−1)), fp16 d per 32 weights."""

    grid: ClassVar[Uniform]
    block_size: ClassVar[int] = 32
    fallback: ClassVar[str] = "f16"
    default_feedback: ClassVar[str] = "column"

    def quantize_block(self, w: Tensor, ctx: BlockContext) -> BlockResult:
        return self.grid.quantize_block(w, ctx)

    def fit_block(self, w: Tensor, ctx: BlockContext):
        return self.grid.fit_block(w, ctx)

    def decode_block(self, params: dict[str, Tensor], shape: tuple[int, int]) -> Tensor:
        return self.grid.decode_block(params, shape)


@register("q4_0")
@dataclass
class Q4_0(UniformType):
    """llama.cpp Q4_0: 4-bit codes and fp16 d per 32 weights, w = d·(q − 8)."""

    grid: ClassVar[Uniform] = Uniform(bits=4, sym=True)
    gguf_type: ClassVar[str] = "Q4_0"


@register("q8_0")
@dataclass
class Q8_0(UniformType):
    """llama.cpp Q8_0: int8 codes and fp16 d per 32 weights, w = d·q."""

    grid: ClassVar[Uniform] = Uniform(bits=8, sym=True)
    gguf_type: ClassVar[str] = "Q8_0"


class F16Fit:
    """Column fit of ``f16``: each column rounded to fp16."""

    def __init__(self, w: Tensor) -> None:
        self.q = torch.zeros_like(w)

    def assign(self, j: int, x: Tensor) -> Tensor:
        self.q[:, j] = to_storage(x)
        return self.q[:, j]

    def result(self) -> BlockResult:
        return F16.result(self.q)


@register("f16")
@dataclass
class F16:
    """The weights in fp16 (16 bpw): llama.cpp's last fallback, for rows no block type divides."""

    gguf_type: ClassVar[str] = "F16"
    default_feedback: ClassVar[str] = "column"

    @staticmethod
    def result(q: Tensor) -> BlockResult:
        return BlockResult(q, {"w": q.half()}, Bits(sign=PARAM_BITS * q.numel(), weights=q.numel()))

    def quantize_block(self, w: Tensor, ctx: BlockContext) -> BlockResult:
        return self.result(to_storage(w))

    def fit_block(self, w: Tensor, ctx: BlockContext) -> F16Fit:
        return F16Fit(w)

    def decode_block(self, params: dict[str, Tensor], shape: tuple[int, int]) -> Tensor:
        return params["w"].float()
