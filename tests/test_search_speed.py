"""The fast column-count search (closed-form errors, then the direct float32 evaluation only near the best)
chooses exactly what the direct evaluation of every candidate chooses (issue #16: bit-identical speed-ups)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from onebit.methods.binarize import PrefixSets, chunk_size, residual_error, residual_error_closed
from onebit.methods.salient import first_minimum, salient_columns, salient_metric


def ref_residual_error(x: np.ndarray, order: int) -> float:
    """Float64 residual binarization of one set of values, written plainly (sign(0) = +1)."""
    r = x.astype(np.float64).copy()
    for _ in range(order):
        if r.size == 0:
            return 0.0
        mu = r.mean()
        dev = r - mu
        alpha = np.abs(dev).mean()
        r = dev - alpha * np.where(dev >= 0, 1.0, -1.0)
    return float(np.sum(r**2))


def direct_search(t: torch.Tensor, up_lim: int, order: int) -> torch.Tensor:
    """Every candidate evaluated directly (the search before issue #16), first minimum."""
    n, b = t.shape
    lim = min(up_lim, b)
    if lim < 2:
        return torch.zeros(b, dtype=torch.bool)
    cand = torch.topk(t.abs().sum(0), lim).indices
    rank = torch.full((b,), b, dtype=torch.long)
    rank[cand] = torch.arange(lim)
    ks = torch.arange(1, lim)
    step = chunk_size(n * b)
    errs = [residual_error(t[:, cand], (torch.arange(lim) < ks[c : c + step, None]).unsqueeze(1), 2)
            + residual_error(t, (rank >= ks[c : c + step, None]).unsqueeze(1), order) for c in range(0, len(ks), step)]
    return rank < int(torch.argmin(torch.cat(errs))) + 1


@pytest.mark.parametrize("order", [1, 2])
def test_closed_form_matches_float64_reference(order):
    g = torch.Generator().manual_seed(order)
    x = torch.randn(7, 40, generator=g, dtype=torch.float64)
    x[0] = x[0].round()  # ties at the mean and at the second pass's thresholds
    x[1, :20] = 3.0
    sets = PrefixSets(x).select(torch.arange(1, 41))
    got = residual_error_closed(*sets.totals, sets.below, order)  # (40 sets × 7 rows)
    for k in (1, 2, 3, 17, 40):
        for i in range(7):
            ref = ref_residual_error(x[i, :k].numpy(), order)
            assert got[k - 1, i].item() == pytest.approx(ref, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("shape", [(64, 128), (48, 96), (16, 20), (8, 3), (5, 1)])
def test_search_chooses_as_the_direct_evaluation(order, shape):
    g = torch.Generator().manual_seed(shape[0] * shape[1] + order)
    for trial in range(6):
        w = torch.randn(shape, generator=g) * (torch.rand(shape[1], generator=g) * 3)
        if trial % 2:
            w = (w * 2).round() / 2  # many exact ties between candidates
        if trial == 5:
            w[:, : shape[1] // 2] = 0  # zero columns: several candidates with the same error
        d = torch.rand(shape[1], generator=g) + 0.3
        t = salient_metric(w, d, "hessian" if trial % 3 else "magnitude")
        assert torch.equal(salient_columns(t, 50, order), direct_search(t, 50, order))


def test_first_minimum_evaluates_only_near_candidates_and_keeps_the_first():
    fast = torch.tensor([5.0, 1.0, 1.00001, 3.0, 1.0, 9.0], dtype=torch.float64)
    asked = []

    def direct(c: int) -> torch.Tensor:
        asked.append(c)
        return torch.tensor([5.0, 1.0, 1.0, 3.0, 1.0, 9.0])[c : c + 2]

    assert first_minimum(fast, direct, 2, 1.0) == 1  # a tie in the direct errors: the first one
    assert asked == [0, 2, 4]  # the chunks of candidates 1, 2 and 4; never a far one alone
    asked.clear()
    assert first_minimum(torch.tensor([1.0, float("nan")], dtype=torch.float64), direct, 2, 1.0) == 1
    assert asked == [0]  # non-finite fast errors: everything is evaluated directly
