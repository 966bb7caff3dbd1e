"""Masked residual binarization, the primitive every method builds on (BiLLM ``high_order_residual``).

For a block X (…, n, B) and a boolean mask M, each row i binarizes its masked entries Ω_i:

    R ← 0;  repeat `order` times:  D = X − R;  μ = mean_Ω D;  α = mean_Ω |D − μ|;  b = sign(D − μ);
                                    R ← R + (α b + μ) on Ω

Leading dimensions batch candidates (all masks of a search at once). Empty rows give μ = α = 0.
Signs are binary (b ∈ {−1, +1}, sign(0) = +1): a stored sign plane has no zero, so neither has ours.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import to_storage


def binary_sign(x: Tensor) -> Tensor:
    """±1 with 0 → +1 (what one stored bit decodes to)."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def residual_fit(x: Tensor, mask: Tensor, order: int) -> Tensor:
    """(X − R) ⊙ M: what unrounded residual binarization leaves on the mask (batched like ``residual_error``)."""
    m = mask.to(x.dtype)
    cnt = m.sum(-1, keepdim=True).clamp_min(1.0)
    d = x * m
    for _ in range(order):
        mu = d.sum(-1, keepdim=True) / cnt
        dev = d - mu
        alpha = (dev.abs() * m).sum(-1, keepdim=True) / cnt
        d = (dev - alpha * binary_sign(dev)) * m
    return d


Below = Callable[[Tensor], tuple[Tensor, Tensor]]


def residual_error_closed(cnt: Tensor, s1: Tensor, s2: Tensor, below: Below, order: int) -> Tensor:
    """``residual_error`` of sets of values from their statistics, for order 1 or 2 (float64, any shape).

    A set has ``cnt`` values summing to ``s1`` with squares summing to ``s2``; ``below(θ)`` gives the count and
    sum of its values < θ (θ of the sets' shape). Order 1 leaves Σ(x−μ)² − (Σ|x−μ|)²/cnt. The second pass
    sees x − μ − α above μ (sign +1, x = μ included) and x − μ + α below, shifted by μ₂ = (Σ(x−μ) − α(P−Q))/cnt
    (P, Q: values ≥ μ and < μ), so its absolute deviations are range sums about θ_U = μ + α + μ₂ on the upper
    values and θ_L = μ − α + μ₂ on the lower ones: three ``below`` queries in all.
    """
    cc = cnt.clamp_min(1)
    mu = s1 / cc
    dev = s1 - cnt * mu  # Σ(x − μ), zero up to rounding
    ss = s2 - s1 * mu  # Σ(x − μ)²
    c_mu, s_mu = below(mu)
    sad = dev - 2 * (s_mu - mu * c_mu)  # Σ|x − μ|
    alpha = sad / cc
    if order == 1:
        err = ss - alpha * sad
    elif order == 2:
        mu2 = (dev - alpha * (cnt - 2 * c_mu)) / cc
        ss2 = ss - 2 * alpha * sad + cnt * alpha.square() - cnt * mu2.square()  # Σ(d₂ − μ₂)²
        up_t, lo_t = torch.maximum(mu + alpha + mu2, mu), torch.minimum(mu - alpha + mu2, mu)
        c_up, s_up = below(up_t)
        c_lo, s_lo = below(lo_t)
        upper = (s1 - s_mu) - up_t * (cnt - c_mu) - 2 * ((s_up - s_mu) - up_t * (c_up - c_mu))
        lower = (s_mu - lo_t * c_mu) - 2 * (s_lo - lo_t * c_lo)
        sad2 = upper + lower
        err = ss2 - sad2.square() / cc
    else:
        raise ValueError(f"closed-form residual error has orders 1 and 2, got {order}")
    return torch.where(cnt > 0, err, torch.zeros_like(err))


def residual_error(x: Tensor, mask: Tensor, order: int) -> Tensor:
    """Σ over masked entries of (X − R)² per leading index, for candidate searches.

    ``x`` (…, n, B), ``mask`` bool broadcastable to it; returns a tensor of the leading (batch) shape.
    """
    return residual_fit(x, mask, order).square().sum((-2, -1))


@dataclass
class GroupFit:
    """Stored form of one masked group: per-row ``mu`` (μ₁+…+μ_k merged, n×1), ``alphas`` (order × n × 1),
    ``signs`` (order × n × B, ±1, meaningful on the mask only) and the decoded block ``recon``."""

    mu: Tensor
    alphas: Tensor
    signs: Tensor
    recon: Tensor


def fit_group(x: Tensor, mask: Tensor, order: int, rounded: bool = True) -> GroupFit:
    """Residual binarization of one group with storage-rounded parameters; ``recon`` is zero off the mask.
    ``rounded=False`` keeps the working precision (a start point for further refinement, e.g. ARB)."""
    store = to_storage if rounded else torch.clone
    m = mask.to(x.dtype)
    cnt = m.sum(-1, keepdim=True).clamp_min(1.0)
    approx = torch.zeros_like(x)
    mu_total = torch.zeros_like(cnt)
    alphas, signs = [], []
    for _ in range(order):
        d = (x - approx) * m
        mu = store(d.sum(-1, keepdim=True) / cnt)
        dev = d - mu
        alpha = store((dev.abs() * m).sum(-1, keepdim=True) / cnt)
        b = binary_sign(dev)
        approx = approx + (alpha * b + mu) * m
        mu_total = mu_total + mu
        alphas.append(alpha)
        signs.append(b)
    mu_total = store(mu_total)
    alpha_t, sign_t = torch.stack(alphas), torch.stack(signs)
    return GroupFit(mu_total, alpha_t, sign_t, decode_group(mu_total, alpha_t, sign_t, mask))


def fit_rms_group(x: Tensor, mask: Tensor, center: Tensor | None = None) -> GroupFit:
    """Order-1 group with an RMS scale (HBLLM): μ = mean (or the given stored ``center``), α = √mean(x−μ)²,
    b = sign(x−μ). Unlike mean|x−μ| it is not L2-optimal, but a group of ≤ 2 entries is reproduced exactly.
    Parameters are storage-rounded (α is fitted around the rounded μ); ``recon`` is zero off the mask."""
    m = mask.to(x.dtype)
    cnt = m.sum(-1, keepdim=True).clamp_min(1.0)
    mu = to_storage((x * m).sum(-1, keepdim=True) / cnt) if center is None else center
    dev = (x - mu) * m
    alpha = to_storage((dev.square().sum(-1, keepdim=True) / cnt).sqrt())
    b = binary_sign(dev)
    return GroupFit(mu, alpha[None], b[None], decode_group(mu, alpha[None], b[None], mask))


def decode_group(mu: Tensor, alphas: Tensor, signs: Tensor, mask: Tensor) -> Tensor:
    """Inverse of ``fit_group``: μ + Σ_k α_k b_k on the mask, 0 elsewhere."""
    return (mu + (alphas * signs).sum(0)) * mask.to(mu.dtype)


def chunk_size(per_candidate: int, budget: int = 1 << 18) -> int:
    """How many candidates of ``per_candidate`` elements fit one batched evaluation (bounds memory)."""
    return max(1, budget // max(per_candidate, 1))


class SortedRows:
    """Rows sorted ascending with float64 prefix sums, for O(log B) group statistics over value ranges.

    Order-1 binarization of a group (μ = mean, α = mean|x−μ|, b = sign(x−μ)) leaves the squared error
    Σ(x−μ)² − (Σ|x−μ|)²/cnt, and a group that is a union of value ranges of a row needs only range sums.
    Ties at x = μ contribute the same error for either sign, so this equals ``residual_error(…, 1)``.
    """

    def __init__(self, values: Tensor) -> None:
        xs = values.double().sort(-1).values
        self.xs = xs
        zero = torch.zeros_like(xs[..., :1])
        self.p1 = torch.cat([zero, xs.cumsum(-1)], -1)
        self.p2 = torch.cat([zero, xs.square().cumsum(-1)], -1)

    def index(self, v: Tensor, right: bool = False) -> Tensor:
        """Per-row insertion points of ``v`` (n × K): count of entries < v (or ≤ v with ``right``)."""
        return torch.searchsorted(self.xs, v.contiguous(), right=right)

    def _sum(self, p: Tensor, a: Tensor, b: Tensor) -> Tensor:
        return p.gather(-1, b) - p.gather(-1, a)

    def moments(
        self, ranges: list[tuple[Tensor, Tensor]], center: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(count, Σ(x−c)², Σ|x−c|) of the group made of the index ranges [a, b) (each n × K), about
        ``center`` (broadcastable to n × K) or, by default, the group mean; all float64 (n × K)."""
        cnt = sum((b - a) for a, b in ranges).double()
        s1 = sum(self._sum(self.p1, a, b) for a, b in ranges)
        s2 = sum(self._sum(self.p2, a, b) for a, b in ranges)
        if center is None:
            mu = s1 / cnt.clamp_min(1)
            ss = s2 - s1 * mu
        else:
            mu = center.double().expand_as(s1)
            ss = s2 - 2 * mu * s1 + cnt * mu.square()
        m = self.index(mu)
        sad = torch.zeros_like(mu)
        for a, b in ranges:
            c = torch.minimum(torch.maximum(m, a), b)
            sad += mu * (c - a) - self._sum(self.p1, a, c) + self._sum(self.p1, c, b) - mu * (b - c)
        return cnt, ss, sad

    def order1_error(self, ranges: list[tuple[Tensor, Tensor]]) -> Tensor:
        """Order-1 error of the group made of the index ranges [a, b) (each n × K); → (n × K)."""
        cnt, ss, sad = self.moments(ranges)
        err = ss - sad.square() / cnt.clamp_min(1)
        return torch.where(cnt > 0, err, torch.zeros_like(err))

    def rms_error(self, ranges: list[tuple[Tensor, Tensor]], center: Tensor | None = None) -> Tensor:
        """Error of the group binarized with an RMS scale (``fit_rms_group``): with d = x − c and
        α = √(Σd²/cnt), Σ(d − α·sign d)² = 2Σd² − 2α·Σ|d| (binary signs); → (n × K)."""
        cnt, ss, sad = self.moments(ranges, center)
        ss = ss.clamp_min(0)
        err = 2 * ss - 2 * (ss / cnt.clamp_min(1)).sqrt() * sad
        return torch.where(cnt > 0, err, torch.zeros_like(err))


class PrefixSets:
    """The sets ``values[:, :k]`` (each row's first k values, k = 1 … L), each row sorted once: ``select(ks)``
    gives some of them with O(log L) counts and sums below a threshold."""

    def __init__(self, values: Tensor) -> None:
        x = values.double()
        self.xs, self.pos = x.sort(-1)
        k = torch.arange(1, x.shape[1] + 1, dtype=torch.float64, device=x.device)
        # (count, sum, sum of squares) of every set (L × n)
        self.totals = (k.view(-1, 1).expand(-1, x.shape[0]), x.cumsum(-1).T, x.square().cumsum(-1).T)

    def select(self, ks: Tensor) -> "SelectedSets":
        """The sets k ∈ ``ks``: cumulative membership tables over the sorted positions ((L + 1) × K × n,
        position-major so the running sums are whole-slab additions)."""
        member = (self.pos.T.unsqueeze(1) < ks.view(1, -1, 1)).double()  # (L, K, n): sorted entry in set k
        zero = torch.zeros_like(member[:1])
        return SelectedSets(tuple(t[ks - 1] for t in self.totals), self.xs, torch.cat([zero, member.cumsum(0)]),
                            torch.cat([zero, (member * self.xs.T.unsqueeze(1)).cumsum(0)]))


@dataclass
class SelectedSets:
    """Some of a ``PrefixSets``' sets: ``totals`` (count, sum, sum of squares; K × n each) and ``below``."""

    totals: tuple[Tensor, Tensor, Tensor]
    xs: Tensor  # the rows, sorted (n × L)
    cnt: Tensor  # ((L + 1) × K × n) members among the first p sorted entries
    s1: Tensor  # ((L + 1) × K × n) their sum

    def below(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        """(count, sum) of set k's values < θ in each row; θ is (K × n)."""
        i = torch.searchsorted(self.xs, theta.T.contiguous()).T.unsqueeze(0)  # (1, K, n)
        return self.cnt.gather(0, i).squeeze(0), self.s1.gather(0, i).squeeze(0)
