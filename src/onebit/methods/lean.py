"""Lean 1-bit method (``lean``, issue #18, docs/lean.md): signs on a row ⊗ column scale, no per-weight group
bitmaps, structured salient input channels at a few bits, parameters in fp16, int8 or fp8.

The seed methods spend ~1 bpw on per-weight group bits and ~0.9 bpw on fp16 floats per row per 128-column
block. Here every weight of a block (n × b columns of the engine's ``--blocksize``) is

    Ŵ_ij = μ_ig + α_ig · c_j · ℓ_ij,   ℓ_ij odd in [−(2^k_j − 1), 2^k_j − 1]  (k_j = 1: ℓ = ±1, a sign)

- ``alpha`` (n × groups): a row scale per parameter group g (the block cut into ⌈b / ``param_group``⌉
  near-equal column ranges; ``param_group`` 0 = the block); ``mu`` likewise with ``mean``;
- ``alpha_c`` (b): a column scale per column (arb-rc's α^c, 16/n bpw);
- k_j, the column's bits: 1, or for the salient input channels the bits of their tier. With
  ``salient_structure="channel"`` the channels are ranked once per linear (``prepare_linear``) by a
  calibration score (``salient_metric``) and tier t takes the next ``round(salient_frac[t] · m)`` of them at
  ``salient_bits[t]`` bits (one channel set per linear, shared by all rows); ``"block"`` ranks each block's
  own columns. Stored as ``width0`` … (b bits each: the planes of k_j − 1; none without salient channels).
- the codes: plane ``q0`` (n × b) holds bit 0 of every code (the sign of a 1-bit weight), ``q1`` bit 1 of
  the columns with k_j ≥ 2, and so on.

Fitting: α ⊗ c (and μ) by ARB-RC's alternating least squares on the whole group (``iters`` rounds), α rounded
to its stored dtype, then each column's c by least squares on the rounded α (Lloyd rounds for a multi-bit
column); every float parameter is stored in ``param_dtype`` (``params.py``) and the weights are reconstructed
from the stored values. Column feedback (the default) then assigns each column's codes with these fixed; the
decoder needs no option (codec, bits and groups follow from the stored names and shapes).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .arb import mean_step, rc_init, rc_pair_step, sign_step
from .base import BlockContext, BlockResult, Bits, register, storage_bits
from .params import PARAM_DTYPES, PARAM_SCOPES, decode_param, encode_param, has_param
from .uniform import from_planes, to_planes

STRUCTURES = ("channel", "block")
CHANNEL_METRICS = ("hessian", "hdiag", "obs")
MAX_BITS = 4


def channel_scores(w: Tensor, ctx: BlockContext, metric: str) -> Tensor:
    """Score of each input channel (column) for salience: ``hessian`` H_jj·‖W_:j‖² (activation energy ×
    column energy), ``hdiag`` H_jj, ``obs`` ‖W_:j‖² / d_j² (BiLLM's T = w²/d², summed over rows)."""
    if metric == "hessian":
        return torch.diag(ctx.h).to(w.dtype) * w.square().sum(0)
    if metric == "hdiag":
        return torch.diag(ctx.h).to(w.dtype)
    if metric == "obs":
        return w.square().sum(0) / ctx.d.to(w.dtype).square()
    raise ValueError(f"salient_metric must be one of {CHANNEL_METRICS}, got {metric!r}")


def column_bits(score: Tensor, tiers: list[tuple[float, int]]) -> Tensor:
    """Bits per column (long): 1, except that tier (frac, k) by tier gives the next ``round(frac · m)``
    columns in descending score (ties to the lower index) k bits."""
    m = score.numel()
    order = torch.argsort(score, descending=True, stable=True)
    bits = torch.ones(m, dtype=torch.long, device=score.device)
    pos = 0
    for frac, k in tiers:
        count = round(frac * m)
        bits[order[pos : pos + count]] = k
        pos += count
    return bits


def group_ids(b: int, groups: int, device: torch.device | None = None) -> Tensor:
    """Parameter group of each of a block's b columns: ``groups`` near-equal contiguous ranges."""
    return torch.arange(b, device=device) * groups // b


def level_code(x: Tensor, top: int | Tensor) -> Tensor:
    """Code t ∈ [0, top] of the nearest level 2t − top to x (x = value / step; ties to the lower level,
    NaN to code 0)."""
    t = torch.nan_to_num(torch.ceil((x + top) / 2 - 0.5), nan=0.0).clamp_min(0)
    return torch.minimum(t, torch.as_tensor(top, dtype=t.dtype, device=t.device))


def code_level(code: Tensor, top: int | Tensor) -> Tensor:
    return 2 * code - top


def fit_row_scales(w: Tensor, mask: Tensor, mean: bool, iters: int) -> tuple[Tensor, Tensor]:
    """(α, μ) (n × 1 each; μ = 0 without ``mean``) of μ + (α ⊗ c) ⊙ sign on ``mask``: arb-rc's init, then
    ``iters`` rounds of μ → α, c → sign (ARB's alternating least squares, order 1)."""
    f = rc_init(w, mask, 1)
    for _ in range(iters):
        if mean:
            mean_step(w, mask, f)
        rc_pair_step(w - f.mu, mask, f, 0)
        sign_step(w, mask, f)
    c = f.col[0, 0][mask.any(0)].abs().mean()  # normalize c to mean 1: α carries the magnitude
    return f.alpha[0] * torch.where(c > 0, c, 1.0), f.mu


def fit_column_scales(w: Tensor, row: Tensor, top: Tensor, iters: int) -> Tensor:
    """Per column j the step c_j of Ŵ_ij = row_ij · c_j · ℓ_ij, ℓ odd in [−top_j, top_j]: a min-max start,
    then least squares on the nearest levels (Lloyd rounds; one suffices for a sign, whose levels do not move)."""
    tiny = torch.finfo(w.dtype).tiny
    ok = row != 0
    r = torch.where(ok, w / torch.where(ok, row, 1), 0)
    c = (r.abs().amax(0) / top).clamp_min(tiny)
    for _ in range(max(iters, 1) if bool((top > 1).any()) else 1):
        u = row * code_level(level_code(r / c, top), top)
        den = u.square().sum(0)
        c = torch.where(den > 0, (u * w).sum(0) / den.clamp_min(tiny), c)
    return c


def _as_list(x: float | int | list | tuple) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


@dataclass
class LeanLinear:
    """Per-linear state (``prepare_linear``): the linear's width and, for channel structure, its bits per
    input channel."""

    width: int
    bits: Tensor | None


@register("lean")
@dataclass
class Lean:
    """Signs on row ⊗ column scales, structured salient channels at a few bits, lean parameters.

    Options: ``salient_frac`` and ``salient_bits`` (numbers or equally long lists: tier t = the next
    ``salient_frac[t]`` of the input channels at ``salient_bits[t]`` ∈ 2…4 bits; one number of bits serves
    every tier; salient_frac 0 = no salient channels),
    ``salient_structure`` (channel: one set per linear | block: per block), ``salient_metric`` (hessian |
    hdiag | obs), ``mean`` (a row mean per group), ``param_group`` (columns sharing a row parameter; 0 = the
    block; "row": one per row, needs one block per linear), ``param_dtype`` (fp16 | int8 | fp8),
    ``param_scope`` (row | tensor: what one int8/fp8 scale covers), ``iters`` (refinement rounds)."""

    salient_frac: float | tuple[float, ...] = (0.02, 0.35)
    salient_bits: int | tuple[int, ...] = (4, 2)
    salient_structure: str = "channel"
    salient_metric: str = "obs"
    mean: bool = False
    param_group: int | str = 0
    param_dtype: str = "int8"
    param_scope: str = "tensor"
    iters: int = 15

    default_feedback: ClassVar[str] = "column"

    def __post_init__(self) -> None:
        fracs, bits = _as_list(self.salient_frac), _as_list(self.salient_bits)
        checks = [
            (len(fracs) == len(bits) or len(bits) == 1 or not any(fracs),
             f"{len(fracs)} salient_frac tiers but {len(bits)} salient_bits"),
            (all(f >= 0 for f in fracs) and sum(fracs) <= 1, "salient_frac: fractions ≥ 0 summing to ≤ 1"),
            (all(k in range(2, MAX_BITS + 1) for k in bits), f"salient_bits must be in 2…{MAX_BITS}"),
            (self.salient_structure in STRUCTURES, f"salient_structure must be one of {STRUCTURES}"),
            (self.salient_metric in CHANNEL_METRICS, f"salient_metric must be one of {CHANNEL_METRICS}"),
            (self.param_group == "row" or (isinstance(self.param_group, int) and self.param_group >= 0),
             "param_group must be a column count ≥ 0 (0 = the block) or 'row'"),
            (self.param_dtype in PARAM_DTYPES, f"param_dtype must be one of {PARAM_DTYPES}"),
            (self.param_scope in PARAM_SCOPES, f"param_scope must be one of {PARAM_SCOPES}"),
            (self.iters >= 0, "iters must be ≥ 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"{self.name}: {msg}")

    @property
    def tiers(self) -> list[tuple[float, int]]:
        """[(fraction, bits)] of the salient tiers, highest-scored channels first (empty tiers dropped)."""
        fracs, bits = _as_list(self.salient_frac), _as_list(self.salient_bits)
        return [(f, k) for f, k in zip(fracs, bits * len(fracs) if len(bits) == 1 else bits) if f > 0]

    # -- per linear
    def prepare_linear(self, w: Tensor, ctx: BlockContext) -> LeanLinear:
        """Channel structure: every input channel's bits, from the whole linear's weight and Hessian."""
        if self.salient_structure != "channel" or not self.tiers:
            return LeanLinear(w.shape[1], None)
        return LeanLinear(w.shape[1], column_bits(channel_scores(w, ctx, self.salient_metric), self.tiers))

    def block_bits(self, w: Tensor, ctx: BlockContext) -> Tensor:
        """Bits of each of the block's columns (b,)."""
        lin = ctx.linear if isinstance(ctx.linear, LeanLinear) else self.prepare_linear(w, ctx)
        if lin.bits is not None:
            return lin.bits[ctx.start : ctx.start + w.shape[1]]
        return column_bits(channel_scores(w, ctx, self.salient_metric), self.tiers)

    def groups(self, b: int, ctx: BlockContext) -> int:
        """Number of parameter groups of a b-column block; refuses a group wider than a (non-last) block."""
        lin = ctx.linear if isinstance(ctx.linear, LeanLinear) else None
        if self.param_group == "row":
            if lin is not None and not (ctx.start == 0 and b == lin.width):
                raise ValueError(f"{self.name}: param_group='row' needs one block per linear (--blocksize ≥ in_features)")
            return 1
        if lin is not None and self.param_group > b and ctx.start + b < lin.width:
            raise ValueError(f"{self.name}: param_group {self.param_group} is wider than the {b}-column block: "
                             f"use --blocksize ≥ {self.param_group} (a block is the widest span a parameter covers)")
        return 1 if self.param_group == 0 else -(-b // self.param_group)

    # -- fit, assign, decode
    def fit_block(self, w: Tensor, ctx: BlockContext) -> "LeanFit":
        n, b = w.shape
        kbits = self.block_bits(w, ctx)
        ng = self.groups(b, ctx)
        gid = group_ids(b, ng, w.device)
        alpha, mu = w.new_zeros(n, ng), w.new_zeros(n, ng)
        for g in range(ng):
            alpha[:, g : g + 1], mu[:, g : g + 1] = fit_row_scales(w, (gid == g).expand(n, b), self.mean, self.iters)
        params: dict[str, Tensor] = {}
        top_bits = max((k for _, k in self.tiers), default=1)
        if self.tiers:
            params.update(to_planes(kbits - 1, (top_bits - 1).bit_length(), "width"))
        params.update(code_planes(torch.zeros(n, b, dtype=torch.long, device=w.device), kbits, top_bits))
        params.update(self._encode("alpha", alpha))
        if self.mean:
            params.update(self._encode("mu", mu))
        row = decode_param(params, "alpha").to(w.dtype)[:, gid]
        center = decode_param(params, "mu").to(w.dtype)[:, gid] if self.mean else 0.0
        col = fit_column_scales(w - center, row, (2**kbits - 1).to(w.dtype), self.iters)
        params.update(self._encode("alpha_c", col))
        return LeanFit(self, params, (n, b), w.dtype)

    def _encode(self, name: str, x: Tensor) -> dict[str, Tensor]:
        return encode_param(name, x, self.param_dtype, self.param_scope)

    def quantize_block(self, w: Tensor, ctx: BlockContext) -> BlockResult:
        return self.fit_block(w, ctx).assign_block(w)

    def decode_block(self, params: dict[str, Tensor], shape: tuple[int, int]) -> Tensor:
        center, step, top = block_levels(params, shape)
        return center + step * code_level(block_codes(params, shape), top)


def code_planes(codes: Tensor, kbits: Tensor, planes: int) -> dict[str, Tensor]:
    """Plane ``q{p}`` (p < ``planes``, the method's largest bits, so every block has the same names): bit p
    of the codes of the columns with more than p bits."""
    return {f"q{p}": (codes[:, kbits > p] >> p) & 1 == 1 for p in range(planes)}


def count_planes(params: dict[str, Tensor], prefix: str) -> int:
    """How many bit planes ``{prefix}0``, ``{prefix}1`` … a stored form holds."""
    return sum(1 for key in params if re.fullmatch(rf"{prefix}\d+", key))


def stored_bits(params: dict[str, Tensor], b: int) -> Tensor:
    """Bits of each column (b,) from the ``width`` planes (all 1 without them)."""
    planes = count_planes(params, "width")
    if planes == 0:
        return torch.ones(b, dtype=torch.long, device=params["q0"].device)
    return from_planes(params, planes, "width") + 1


def block_codes(params: dict[str, Tensor], shape: tuple[int, int]) -> Tensor:
    """Every weight's code (n × b, float) from the planes ``q0`` …"""
    kbits = stored_bits(params, shape[1])
    codes = torch.zeros(shape, dtype=torch.long, device=kbits.device)
    for p in range(int(kbits.max())):
        codes[:, kbits > p] |= params[f"q{p}"].long() << p
    return codes.float()


def block_levels(params: dict[str, Tensor], shape: tuple[int, int]) -> tuple[Tensor | float, Tensor, Tensor]:
    """(μ, step, top) of a block: weight (i, j) takes the levels μ_ij + step_ij · ℓ, ℓ odd in [−top_j, top_j]."""
    alpha = decode_param(params, "alpha")
    gid = group_ids(shape[1], alpha.shape[1], alpha.device)
    step = alpha[:, gid] * decode_param(params, "alpha_c")
    center = decode_param(params, "mu")[:, gid] if has_param(params, "mu") else 0.0
    return center, step, (2 ** stored_bits(params, shape[1]) - 1).float()


class LeanFit:
    """``ColumnFit`` with the parameters fixed: each weight takes the nearest of its levels (ties to the
    lower), computed with the decoder's own ``block_levels`` and formula, so the result decodes exactly."""

    def __init__(self, method: Lean, params: dict[str, Tensor], shape: tuple[int, int], dtype: torch.dtype) -> None:
        self.method, self.params, self.shape, self.dtype = method, params, shape, dtype
        self.center, self.step, self.top = block_levels(params, shape)
        self.codes = torch.zeros(shape, device=self.step.device)

    def assign(self, j: int, x: Tensor) -> Tensor:
        center = self.center[:, j] if isinstance(self.center, Tensor) else self.center
        step, top = self.step[:, j], self.top[j]
        c = level_code((x.float() - center) / step, top)
        self.codes[:, j] = c
        return (center + step * code_level(c, top)).to(x.dtype)

    def assign_block(self, w: Tensor) -> BlockResult:
        """Every column at once from ``w`` (no feedback between them)."""
        self.codes = level_code((w.float() - self.center) / self.step, self.top)
        return self.result()

    def result(self) -> BlockResult:
        n, b = self.shape
        kbits = stored_bits(self.params, b)
        params = {**self.params, **code_planes(self.codes.long(), kbits, count_planes(self.params, "q"))}
        sign = n * int(kbits.sum())
        bitmap = sum(t.numel() for key, t in params.items() if key.startswith("width"))
        bits = Bits(sign=sign, bitmap=bitmap, params=storage_bits(params) - sign - bitmap, weights=n * b)
        q = self.method.decode_block(params, (n, b)).to(self.dtype)
        sal = kbits > 1
        return BlockResult(q, params, bits, {"salient_cols": int(sal.sum()), "salient_code_bits": int(kbits[sal].sum())})
