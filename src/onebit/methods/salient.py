"""BiLLM's two searches, shared by every method that uses salient columns and a bell-shaped split
(braq, ARB, DBellQuant): the salient metric, the structural column search, the break-point search.

Both searches evaluate all their candidates at once as batched tensors (chunked to bound memory): no
per-candidate Python loop, no CPU round trip. Tie-breaking keeps the reference's "first minimum".
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..timing import timed
from .binarize import SortedRows, chunk_size, residual_error

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
    ks = torch.arange(1, lim, device=t.device)
    top = t[:, cand]  # salient candidates are prefixes of the l1-ranked columns
    step = chunk_size(n * b)
    errs = []
    for c in range(0, len(ks), step):
        kk = ks[c : c + step, None]
        sal = (torch.arange(lim, device=t.device) < kk).unsqueeze(1)  # (K, 1, lim)
        rest = (rank >= kk).unsqueeze(1)  # (K, 1, B)
        errs.append(residual_error(top, sal, 2) + residual_error(t, rest, order))
    k = _batched_min(errs) + 1
    return rank < k


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
