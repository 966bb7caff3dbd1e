"""BiLLM's two searches, shared by every method that uses salient columns and a bell-shaped split
(braq, ARB, DBellQuant): the salient metric, the structural column search, the break-point search.

The searches evaluate all their candidates at once as batched tensors (chunked to bound memory): no
per-candidate Python loop, no CPU round trip. Tie-breaking keeps the reference's "first minimum". The column
search scores its candidates in closed form first and evaluates directly only those that can be the first
minimum (``first_minimum``): the same choice as evaluating all, at a fraction of the cost (issue #16).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..timing import speedups, timed
from .binarize import PrefixSets, SortedRows, chunk_size, residual_error, residual_error_closed

SALIENT_METRICS = ("hessian", "magnitude")
SPLIT_QUANTILES = torch.linspace(0.10, 0.90, 81, dtype=torch.float64)


def salient_metric(w: Tensor, d: Tensor, metric: str) -> Tensor:
    """BiLLM §3: ``hessian`` → T = w²/d² (d_j = U_jj; no extra square), ``magnitude`` → T = w (signed)."""
    if metric == "hessian":
        return w.square() / d.square().unsqueeze(0)
    if metric == "magnitude":
        return w
    raise ValueError(f"salient metric must be one of {SALIENT_METRICS}, got {metric!r}")


def _batched_min(errs: list[Tensor]) -> int:
    return int(torch.argmin(torch.cat(errs)).item())  # first minimum, as the reference


@timed("searches")
def salient_columns(t: Tensor, up_lim: int = 50, order: int = 2, score: str = "l1") -> Tensor:
    """Structural search (BiLLM §4): the k* best columns of T, k ∈ 1 … min(up_lim, B) − 1, ranked by the
    column ``score`` "l1" (Σ_i |T_ij|, BiLLM) or "l2" (‖T_:j‖₂, HBLLM).

    Candidate k makes the top-k columns salient; its error is ‖T − braq(T, S_k, 2) − braq(T, ¬S_k, order)‖².
    Returns the boolean column mask (B,). Blocks narrower than ``up_lim`` are clamped (reference bug #12).

    Every candidate is first scored in closed form (``PrefixSets``: float64 range sums, a few passes over
    n × up_lim instead of order × ~12 passes over n × (B + up_lim)); only the candidates within a rounding
    margin of the best are scored again by the direct float32 evaluation, whose first minimum is the answer,
    so the choice is the direct evaluation's, bit for bit, at a fraction of its cost.
    """
    n, b = t.shape
    lim = min(up_lim, b)
    if lim < 2:
        return torch.zeros(b, dtype=torch.bool, device=t.device)
    if score not in ("l1", "l2"):
        raise ValueError(f"column score must be l1 or l2, got {score!r}")
    cand = torch.topk(t.abs().sum(0) if score == "l1" else t.square().sum(0), lim).indices
    rank = torch.full((b,), b, dtype=torch.long, device=t.device)
    rank[cand] = torch.arange(lim, device=t.device)
    top = t[:, cand]  # salient candidates are prefixes of the ranked columns
    step = chunk_size(n * b)

    def direct(c: int) -> Tensor:
        """The chunk of candidates starting at index c, evaluated directly (float32, masked)."""
        kk = torch.arange(1, lim, device=t.device)[c : c + step, None]
        sal = (torch.arange(lim, device=t.device) < kk).unsqueeze(1)  # (K, 1, lim)
        rest = (rank >= kk).unsqueeze(1)  # (K, 1, B)
        return residual_error(top, sal, 2) + residual_error(t, rest, order)

    fast = _salient_errors(t, top, order) if speedups() else torch.full((lim - 1,), math.nan, dtype=torch.float64)
    k = first_minimum(fast, direct, step, float(t.double().square().sum())) + 1
    return rank < k


def _salient_errors(t: Tensor, top: Tensor, order: int) -> Tensor:
    """Closed-form float64 errors of salient_columns' candidates k = 1 … L − 1 (L = top's width), a few
    candidates at a time so that their tables stay in cache."""
    n, lim = top.shape
    full = SortedRows(t)
    row = (float(t.shape[1]), full.p1[:, -1], full.p2[:, -1])
    sets = PrefixSets(top)
    step = chunk_size(n * (lim + 1), 1 << 16)
    out = []
    for c in range(1, lim, step):
        sal = sets.select(torch.arange(c, min(c + step, lim), device=t.device))

        def rest_below(theta: Tensor) -> tuple[Tensor, Tensor]:
            i = full.index(theta.T.contiguous()).T
            cnt, s = sal.below(theta)
            return i.double() - cnt, full.p1.gather(-1, i.T).T - s

        rest = tuple(r - s for r, s in zip(row, sal.totals))
        out.append((residual_error_closed(*sal.totals, sal.below, 2) + residual_error_closed(*rest, rest_below, order)).sum(-1))
    return torch.cat(out)


def first_minimum(fast: Tensor, direct: Callable[[int], Tensor], step: int, scale: float, margin: float = 1e-4) -> int:
    """Index of the first minimum of a search's direct errors, evaluated only where it can lie.

    ``fast`` (K,) approximates the direct errors (float64, closed form); the direct ones carry float32
    rounding, far below ``margin`` × the best error + ``margin`` × 1e-4 × ``scale`` (the energy searched). Every
    candidate farther than that above the best fast error is worse than the best, so only the chunks
    (``direct(c)``: candidates c … c + step − 1, the chunks a direct search evaluates) holding candidates within
    it are evaluated, and their first minimum is the direct search's. Non-finite fast errors: all are evaluated.
    """
    if bool(torch.isfinite(fast).all()):
        best = float(fast.min())
        near = (fast <= best + margin * (abs(best) + 1e-4 * scale)).nonzero().flatten().tolist()
    else:
        near = list(range(len(fast)))
    chunks = sorted({i - i % step for i in near})
    errs = {c: direct(c) for c in chunks}
    vals = torch.stack([errs[i - i % step][i % step] for i in near])
    return near[int(torch.argmin(vals).item())]  # first minimum (NaN first), as a direct search's argmin


@timed("searches")
def split_threshold(t: Tensor, salient: Tensor) -> tuple[Tensor, Tensor]:
    """Bell-shaped split search (BiLLM §5) on T outside the salient columns.

    Candidates: the 10 %…90 % quantiles (81, linear interpolation) of |T ⊙ ¬S| *including* the zeros at
    salient positions. Each p splits ¬S into concentrated |T| < p and sparse |T| ≥ p, each order 1; the
    salient part is fixed, so it drops out of the argmin. All 81 errors come from one sort of each row and
    prefix sums (``SortedRows``). Returns (concentrated, sparse) masks (n × B).
    """
    free = ~salient.unsqueeze(0).expand_as(t)
    mag = (t * free).abs()
    qs = split_quantiles(mag)
    # rows of free values sorted once: concentrated = (−p, p) is one value range, sparse the two outside
    rows = SortedRows(t[:, ~salient])
    p = qs.double().unsqueeze(0).expand(t.shape[0], -1)
    lo, hi = rows.index(-p, right=True), rows.index(p)
    end = torch.full_like(lo, rows.xs.shape[-1])
    err = rows.order1_error([(lo, hi)]) + rows.order1_error([(torch.zeros_like(lo), lo), (hi, end)])
    best = qs[_batched_min([err.sum(0)])]
    return free & (mag < best), free & (mag >= best)


def split_quantiles(mag: Tensor, nonzero: bool = False) -> Tensor:
    """The 81 break-point candidates: 10 %…90 % quantiles of all entries of ``mag`` (or of its non-zeros)."""
    v = mag.flatten().double()
    if nonzero:
        v = v[v != 0]
    if v.numel() == 0:
        v = torch.zeros(1, dtype=torch.float64, device=mag.device)
    return torch.quantile(v, SPLIT_QUANTILES.to(v.device)).to(mag.dtype)


SplitError = Callable[[Tensor, Tensor], Tensor]


@timed("searches")
def split_search(
    t: Tensor, free: Tensor, order: int = 1, nonzero: bool = False, error: SplitError | None = None
) -> tuple[Tensor, Tensor]:
    """Break-point search on any element mask ``free`` (n × B): (concentrated |T| < p, sparse |T| ≥ p).

    Generalizes ``split_threshold`` (ARB's CGB split of the salient columns, repeated splits): candidates
    from ``split_quantiles(|T ⊙ free|, nonzero)``; ``error(conc, sparse)`` scores a batch of K candidate
    mask pairs (K × n × B) → (K,); by default the order-``order`` binarization error of both parts.
    """
    mag = (t * free).abs()
    qs = split_quantiles(mag, nonzero)
    if error is None:
        def error(conc: Tensor, sparse: Tensor) -> Tensor:
            return residual_error(t, conc, order) + residual_error(t, sparse, order)

    step = chunk_size(t.numel())
    errs = []
    for c in range(0, len(qs), step):
        p = qs[c : c + step, None, None]
        errs.append(error(free & (mag < p), free & (mag >= p)))
    best = qs[_batched_min(errs)]
    return free & (mag < best), free & (mag >= best)
