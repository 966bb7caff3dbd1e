"""ARB-LLM (``arb``, ``arb-x``, ``arb-rc``; arb-llm.md): BiLLM's block layout and searches with the one-shot
residual binarizer replaced by alternating closed-form refinement, plus the column-group bitmap (CGB).

Every group Ω (a mask of the block) is fitted as Ŵ = μ + Σ_k (α_k ⊗ c_k) ⊙ B_k on Ω (``GroupState``):
- ``arb``: start from BiLLM's residual fit, then ``iters`` rounds of μ → α → B, each the exact minimizer of
  ‖W − Ŵ‖² over Ω given the rest (§1 order 1, §2 order 2: B = nearest of the 2^order levels).
- ``arb-x``: the same, then ``iters_x`` rounds of μ → α (B frozen) minimizing tr(R S Rᵀ), R = (W − Ŵ) ⊙ M,
  with S = the block's Hessian H[J, J] = (2/N)·XᵀX (§3): no calibration inputs kept, memory ∝ B², not N.
- ``arb-rc``: no mean, row × column scales α^r ⊗ α^c, B₁ = sign(W) fixed; ``iters`` rounds of least squares
  in α^r then α^c (order 2: pair 1, pair 2, then nearest-level B) (§4).

Searches on the metric T (§5): BiLLM's salient columns; with ``cgb`` the salient columns are split too
(order-2 error, quantiles of the non-zero |T|); the non-salient split is BiLLM's (arb-x scores it by
tr(R S Rᵀ) with the salient part fixed to its ARB fit, as the reference); ``num_p`` repeats each split on
the remaining concentrated part. Zone 0 of a region is its concentrated part, zone r the sparse part of
round r.

Stored form (``BlockResult`` convention), n × B block with k salient columns, Z = num_p + 1 zones per
split region, P = ⌈log₂ Z⌉ group-index bit planes:
``salient_cols`` (B), ``signs`` (n × B), ``signs2`` (n × k), ``sparse`` [+ ``sparse_b1`` …] (P × n × (B−k):
bits of the non-salient zone index), with CGB ``sal_sparse`` [+ ``sal_sparse_b1`` …] (P × n × k); floats
per zone in order (non-salient zones, then salient zones; a salient zone has two planes):
``mu`` (n × zones) and ``alpha`` (n × planes) for arb/arb-x; ``alpha_r`` (n × planes), ``alpha_c``
(Z × (B−k)) and ``alpha_c_sal`` (2·zones_sal × k) for arb-rc. Without CGB and with num_p = 1, arb and arb-x
store exactly braq's layout (``braq_decode`` reads them).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..timing import timed
from .base import PARAM_BITS, BlockContext, BlockResult, Bits, LevelFit, bits_to_signs, register, sign_plane_fit, signs_to_bits
from .binarize import binary_sign, decode_group, fit_group, residual_fit
from .braq import braq_bits
from .salient import salient_columns, salient_metric, split_search, split_threshold


@dataclass
class GroupState:
    """One group: ``mu`` (n × 1; 0 for RC), ``alpha`` (order × n × 1 row scales), ``col`` (order × 1 × B
    column scales, or ones), ``signs`` (order × n × B, ±1; only the mask matters)."""

    mu: Tensor
    alpha: Tensor
    col: Tensor
    signs: Tensor

    def planes(self) -> Tensor:
        """(α_k ⊗ c_k) ⊙ B_k for every order k (order × n × B)."""
        return self.alpha * self.col * self.signs

    def recon(self, mask: Tensor) -> Tensor:
        return decode_group(self.mu, self.alpha * self.col, self.signs, mask)


def _rowsum(x: Tensor) -> Tensor:
    return x.sum(-1, keepdim=True)


def _ratio(num: Tensor, den: Tensor, prev: Tensor) -> Tensor:
    """num / den, keeping the previous value where the denominator vanishes (empty group or column)."""
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), prev)


def _others(f: GroupState, k: int) -> Tensor:
    p = f.planes()
    return p.sum(0) - p[k]


# ---- ARB (§1, §2): weight-space error ‖(W − Ŵ) ⊙ M‖² ------------------------------------------------
def arb_init(w: Tensor, mask: Tensor, order: int) -> GroupState:
    """BiLLM's residual binarization in working precision (μ = μ₁ + … + μ_order)."""
    f = fit_group(w, mask, order, rounded=False)
    return GroupState(f.mu, f.alphas, torch.ones_like(f.alphas), f.signs)


def mean_step(w: Tensor, mask: Tensor, f: GroupState) -> None:
    """μ ← mean_Ω(W − Σ_k α_k B_k)."""
    m = mask.to(w.dtype)
    f.mu = _rowsum((w - f.planes().sum(0)) * m) / _rowsum(m).clamp_min(1)


def scale_step(w: Tensor, mask: Tensor, f: GroupState) -> None:
    """α_k ← Σ_Ω B_k (W − μ − Σ_{l≠k} α_l B_l) / |Ω| for k = 1, 2, … in turn (α₂ uses the new α₁)."""
    m = mask.to(w.dtype)
    cnt = _rowsum(m)
    for k in range(f.alpha.shape[0]):
        f.alpha[k] = _ratio(_rowsum(f.signs[k] * (w - f.mu - _others(f, k)) * m), cnt, f.alpha[k])


def sign_step(w: Tensor, mask: Tensor, f: GroupState) -> None:
    """B ← per element the nearest of the 2^order levels μ + Σ_k ±α_k c_k; ties to the lowest index, the
    levels ordered (−,−), (−,+), (+,−), (+,+) as the reference. For order 1 and α ≥ 0 this is sign(W − μ)."""
    order = f.signs.shape[0]
    if order == 1:  # the nearest of μ ± a: + iff (W − μ)·a > 0 (a tie goes to index 0, i.e. −)
        f.signs = torch.where((w - f.mu) * (f.alpha[0] * f.col[0]) > 0, 1.0, -1.0).to(w.dtype)[None]
        return
    table = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=order)), dtype=w.dtype, device=w.device)
    levels = torch.einsum("lk,k...->...l", table, f.alpha * f.col)  # levels last: a contiguous argmin
    idx = ((w - f.mu).unsqueeze(-1) - levels).abs().argmin(-1)
    f.signs = table[idx].movedim(-1, 0).contiguous()


@timed("refinement")
def arb_fit(w: Tensor, mask: Tensor, order: int, iters: int) -> GroupState:
    f = arb_init(w, mask, order)
    for _ in range(iters):
        mean_step(w, mask, f)
        scale_step(w, mask, f)
        sign_step(w, mask, f)
    return f


# ---- ARB-X (§3): tr(R S Rᵀ), R = (W − Ŵ) ⊙ M, as row reductions (no n × B × B tensors) ---------------
def x_mean_step(w: Tensor, mask: Tensor, f: GroupState, s: Tensor) -> None:
    """μ_i ← (W̃ − Σ α_k B̃_k)_i S m_iᵀ / m_i S m_iᵀ."""
    m = mask.to(w.dtype)
    num = _rowsum((((w - f.planes().sum(0)) * m) @ s) * m)
    f.mu = _ratio(num, _rowsum((m @ s) * m), f.mu)


def x_scale_step(w: Tensor, mask: Tensor, f: GroupState, s: Tensor) -> None:
    """α_k ← B̃_k S (W̃ − μ m − Σ_{l≠k} α_l B̃_l)ᵀ / B̃_k S B̃_kᵀ, k in turn."""
    m = mask.to(w.dtype)
    for k in range(f.alpha.shape[0]):
        bk = f.signs[k] * m
        target = (w - f.mu - _others(f, k)) * m
        f.alpha[k] = _ratio(_rowsum((target @ s) * bk), _rowsum((bk @ s) * bk), f.alpha[k])


@timed("refinement")
def arb_x_fit(w: Tensor, mask: Tensor, order: int, iters: int, iters_x: int, s: Tensor) -> GroupState:
    f = arb_fit(w, mask, order, iters)
    for _ in range(iters_x):
        x_mean_step(w, mask, f, s)
        x_scale_step(w, mask, f, s)
    return f


# ---- ARB-RC (§4): Ŵ = Σ_k (α^r_k ⊗ α^c_k) ⊙ B_k, no mean ------------------------------------------------
def rc_init(w: Tensor, mask: Tensor, order: int) -> GroupState:
    """Paper Eq. 12, residual-wise: α^r = mean_Ω|R|, α^c_j = mean over the group's rows of |R_ij| / α^r_i,
    B = sign(R), R ← R − (α^r ⊗ α^c) ⊙ B."""
    m = mask.to(w.dtype)
    r = w * m
    alphas, cols, signs = [], [], []
    for _ in range(order):
        ar = _rowsum(r.abs()) / _rowsum(m).clamp_min(1)
        ok = m * (ar > 0)
        ratio = r.abs() / ar.clamp_min(torch.finfo(w.dtype).tiny) * ok
        ac = ratio.sum(0, keepdim=True) / ok.sum(0, keepdim=True).clamp_min(1)
        b = binary_sign(r)
        r = (r - ar * ac * b) * m
        alphas.append(ar)
        cols.append(ac)
        signs.append(b)
    return GroupState(torch.zeros_like(alphas[0]), torch.stack(alphas), torch.stack(cols), torch.stack(signs))


def rc_pair_step(w: Tensor, mask: Tensor, f: GroupState, k: int) -> None:
    """Least squares in α^r_k, then in α^c_k, against W − the other pairs (paper Eq. 13)."""
    m = mask.to(w.dtype)
    target = (w - _others(f, k)) * m
    bk = f.signs[k] * m
    u = f.col[k] * bk
    f.alpha[k] = _ratio(_rowsum(u * target), _rowsum(u * u), f.alpha[k])
    v = f.alpha[k] * bk
    f.col[k] = _ratio((v * target).sum(0, keepdim=True), (v * v).sum(0, keepdim=True), f.col[k])


@timed("refinement")
def rc_fit(w: Tensor, mask: Tensor, order: int, iters: int) -> GroupState:
    f = rc_init(w, mask, order)
    for _ in range(iters):
        for k in range(order):
            rc_pair_step(w, mask, f, k)
        if order > 1:  # order 1 keeps B = sign(W)
            sign_step(w, mask, f)
    return f


# ---- the methods -----------------------------------------------------------------------------------------
def _plane_keys(prefix: str, zones: int) -> list[str]:
    """Keys of the bit planes of a zone index in 0 … zones−1 (bit 0 is named like braq's ``sparse``)."""
    planes = max(1, (zones - 1).bit_length())
    return [prefix] + [f"{prefix}_b{j}" for j in range(1, planes)]


def _scatter(sub: Tensor, cols: Tensor) -> Tensor:
    full = torch.zeros(sub.shape[0], cols.numel(), dtype=sub.dtype, device=sub.device)
    full[:, cols] = sub
    return full


@register("arb")
@dataclass
class Arb:
    """ARB: alternating refinement in weight space. Options: ``iters`` refinement rounds (15, the reference's
    hard-coded value), ``cgb`` column-group bitmap (4 zones; +3 fp16 per row per block, 0.375 bpw), ``num_p``
    split rounds per region (num_p + 1 zones, ⌈log₂(num_p + 1)⌉ group bits), ``salient_metric``, ``up_lim``.

    ``cgb`` defaults to False here: plain ``arb`` is ARB's binarizer on BiLLM's partition, so it stores exactly
    braq's layout and bits and isolates what the refinement alone buys; the paper's final recipes are
    ``arb-x`` and ``arb-rc``, which default to CGB on (its ablation "ARB with CGB" is ``arb --cgb``).
    """

    iters: int = 15
    cgb: bool = False
    num_p: int = 1
    salient_metric: str = "hessian"
    up_lim: int = 50

    rc: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.num_p < 1 or self.iters < 0:
            raise ValueError(f"{self.name}: need num_p ≥ 1 and iters ≥ 0, got {self.num_p}, {self.iters}")

    def fit(self, w: Tensor, mask: Tensor, order: int, ctx: BlockContext) -> GroupState:
        return arb_fit(w, mask, order, self.iters)

    # -- searches on T
    def zones(self, w: Tensor, ctx: BlockContext) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """(salient columns (B,), non-salient zones, salient zones): n × B masks partitioning the block."""
        t = salient_metric(w, ctx.d, self.salient_metric)
        cols = salient_columns(t, self.up_lim)
        sal = cols.unsqueeze(0).expand_as(t)
        free, sparse = ~sal, []
        for _ in range(self.num_p):
            free, part = self.split_rest(t, free, sal, sparse, ctx)
            sparse.append(part)
        return cols, [free, *sparse], self.cgb_zones(t, cols) if self.cgb else [sal]

    def cgb_zones(self, t: Tensor, cols: Tensor) -> list[Tensor]:
        """CGB: split the salient columns like the rest, scored by the order-2 error (weight space)."""
        ts = t[:, cols]
        free, sparse = torch.ones_like(ts, dtype=torch.bool), []
        for _ in range(self.num_p):
            free, part = split_search(ts, free, order=2, nonzero=True)
            sparse.append(part)
        return [_scatter(z, cols) for z in (free, *sparse)]

    def split_rest(
        self, t: Tensor, free: Tensor, sal: Tensor, sparse: list[Tensor], ctx: BlockContext
    ) -> tuple[Tensor, Tensor]:
        """One split round of the still-concentrated non-salient weights ``free`` → (concentrated, sparse).
        Weight-space error, so the groups already fixed drop out; the first round is braq's own search."""
        if torch.equal(free, ~sal):
            return split_threshold(t, sal[0])
        return split_search(t, free, order=1)

    # -- stored form
    def quantize_block(self, w: Tensor, ctx: BlockContext) -> BlockResult:
        cols, ns_zones, s_zones = self.zones(w, ctx)
        fits = [(self.fit(w, z, 1, ctx), z) for z in ns_zones] + [(self.fit(w, z, 2, ctx), z) for z in s_zones]
        signs = sum(f.signs[0] * z for f, z in fits)
        signs2 = sum(f.signs[1] * z for f, z in fits[len(ns_zones):])
        params = {"salient_cols": cols.clone(), "signs": signs_to_bits(signs), "signs2": signs_to_bits(signs2[:, cols])}
        params.update(self._zone_bits("sparse", ns_zones, ~cols))
        if self.cgb:
            params.update(self._zone_bits("sal_sparse", s_zones, cols))
        params["alpha_r" if self.rc else "alpha"] = torch.cat([a for f, _ in fits for a in f.alpha], 1).half()
        if self.rc:
            params["alpha_c"] = torch.cat([f.col[0][:, ~cols] for f, _ in fits[: len(ns_zones)]]).half()
            params["alpha_c_sal"] = torch.cat([c[:, cols] for f, _ in fits[len(ns_zones):] for c in f.col]).half()
        else:
            params["mu"] = torch.cat([f.mu for f, _ in fits], 1).half()
        n, b = w.shape
        k = int(cols.sum())
        q = self.decode_block(params, (n, b)).to(w.dtype)
        return BlockResult(q, params, self.bits(n, b, k), {"salient_cols": k})

    @staticmethod
    def _zone_bits(prefix: str, zones: list[Tensor], cols: Tensor) -> dict[str, Tensor]:
        idx = sum(i * z.long() for i, z in enumerate(zones))[:, cols]
        return {key: (idx >> j) & 1 == 1 for j, key in enumerate(_plane_keys(prefix, len(zones)))}

    @staticmethod
    def _zones_of(params: dict[str, Tensor], prefix: str, zones: int, cols: Tensor, n: int) -> list[Tensor]:
        idx = torch.zeros(n, int(cols.sum()), dtype=torch.long, device=cols.device)
        for j, key in enumerate(_plane_keys(prefix, zones)):
            idx |= params[key].long() << j
        return [_scatter(idx == z, cols) for z in range(zones)]

    def fit_block(self, w: Tensor, ctx: BlockContext) -> LevelFit:
        """Column feedback: this block's masks and parameters, both sign planes re-assigned per column."""
        return sign_plane_fit(self, w, ctx, ("signs", "signs2"))

    def decode_block(self, params: dict[str, Tensor], shape: tuple[int, int]) -> Tensor:
        n, b = shape
        cols = params["salient_cols"]
        zones = self.num_p + 1
        ns_zones = self._zones_of(params, "sparse", zones, ~cols, n)
        s_zones = self._zones_of(params, "sal_sparse", zones, cols, n) if self.cgb else [cols.expand(n, b)]
        s2 = torch.zeros(shape, device=cols.device)
        s2[:, cols] = bits_to_signs(params["signs2"])
        signs = torch.stack([bits_to_signs(params["signs"]), s2])
        alpha = params["alpha_r" if self.rc else "alpha"].float()
        if self.rc:
            col = torch.cat([_scatter(params["alpha_c"].float(), ~cols), _scatter(params["alpha_c_sal"].float(), cols)])
            mu = torch.zeros(n, len(ns_zones) + len(s_zones), device=cols.device)
        else:
            col, mu = torch.ones(alpha.shape[1], 1, device=cols.device), params["mu"].float()
        q, plane = torch.zeros(shape, device=cols.device), 0
        for z, (zone, order) in enumerate([(m, 1) for m in ns_zones] + [(m, 2) for m in s_zones]):
            scales = (alpha[:, plane : plane + order].T[..., None] * col[plane : plane + order, None, :])
            q += decode_group(mu[:, z : z + 1], scales, signs[:order], zone)
            plane += order
        return q

    def bits(self, n: int, b: int, k: int) -> Bits:
        """braq's count plus: extra group-index planes (P − 1 over the non-salient weights, P over the
        salient ones with CGB) and the floats: per row μ (not RC) and one α per plane; RC's α^c vectors."""
        zones = self.num_p + 1
        s_zones = zones if self.cgb else 1
        planes = len(_plane_keys("", zones))
        per_row = (0 if self.rc else zones + s_zones) + zones + 2 * s_zones
        extra_bitmap = (planes - 1) * n * (b - k) + (planes * n * k if self.cgb else 0)
        col_floats = zones * (b - k) + 2 * s_zones * k if self.rc else 0
        return braq_bits(n, b, k, per_row) + Bits(bitmap=extra_bitmap, params=col_floats * PARAM_BITS)


@register("arb-x")
@dataclass
class ArbX(Arb):
    """ARB-X (final recipe ARB-LLM_X = arb-x + CGB, the default): ARB, then ``iters_x`` rounds of μ, α
    (B frozen) under the calibration-weighted error with S = the block's Hessian (XᵀX up to 2/N); the
    non-salient split is scored by tr(R S Rᵀ) with the salient part fixed to its ARB fit (reference)."""

    iters_x: int = 15
    cgb: bool = True

    def fit(self, w: Tensor, mask: Tensor, order: int, ctx: BlockContext) -> GroupState:
        return arb_x_fit(w, mask, order, self.iters, self.iters_x, ctx.h.to(w.dtype))

    def split_rest(
        self, t: Tensor, free: Tensor, sal: Tensor, sparse: list[Tensor], ctx: BlockContext
    ) -> tuple[Tensor, Tensor]:
        s = ctx.h.to(t.dtype)
        fixed = arb_fit(t, sal, 2, self.iters).recon(sal) + sum(arb_fit(t, p, 1, self.iters).recon(p) for p in sparse)
        base = (t - fixed) * ~free

        def error(conc: Tensor, part: Tensor) -> Tensor:
            r = residual_fit(t, conc, 1) + residual_fit(t, part, 1) + base
            return ((r @ s) * r).sum((-2, -1))

        return split_search(t, free, order=1, error=error)


@register("arb-rc")
@dataclass
class ArbRC(Arb):
    """ARB-RC (final recipe ARB-LLM_RC = arb-rc + CGB, the default): row × column scales, no mean,
    weight-space error; stores α^r per row per plane and one α^c vector per plane over its columns."""

    cgb: bool = True

    rc: ClassVar[bool] = True

    def fit(self, w: Tensor, mask: Tensor, order: int, ctx: BlockContext) -> GroupState:
        return rc_fit(w, mask, order, self.iters)
