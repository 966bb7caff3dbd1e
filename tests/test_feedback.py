"""Column-wise error feedback (engine/solver.py) and the k-bit / ternary baselines (methods/uniform.py,
methods/ternary.py), each against an independent float64 reference or a hand-computed case."""

from __future__ import annotations

import pytest
import torch

from onebit.engine.solver import quantize_linear
from onebit.methods import build_method
from onebit.methods.base import BlockContext, storage_bits


def real_hessian(m: int, seed: int, tokens: int = 1024) -> torch.Tensor:
    """H = (2/N)·XᵀX of correlated inputs with a few loud channels (as LLM activations have) and a dead one."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, m, generator=g, dtype=torch.float64)
    x = x + 0.7 * x.roll(1, 1) + 0.3 * x.roll(5, 1)
    x *= torch.exp(torch.randn(m, generator=g, dtype=torch.float64))
    x[:, 7] = 0
    return 2 * x.T @ x / tokens


def ref_grid(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's asymmetric min/max grid per row, the scale rounded to fp16: (scale, zero), each n × 1."""
    maxq = 2**bits - 1
    lo = torch.clamp(w.min(1, keepdim=True).values, max=0)
    hi = torch.clamp(w.max(1, keepdim=True).values, min=0)
    scale = ((hi - lo) / maxq).half().double()
    return scale, torch.round(-lo / scale).clamp(0, maxq)


def ref_gptq(w: torch.Tensor, h: torch.Tensor, bits: int, group: int, percdamp: float, act_order: bool) -> torch.Tensor:
    """Plain float64 GPTQ: one column at a time, every later column updated at once (no lazy batches);
    static act-order = grids fixed from the original weights, columns visited by descending diag(H)."""
    w, h = w.double().clone(), h.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    m = w.shape[1]
    perm = torch.argsort(torch.diag(h), descending=True, stable=True) if act_order else torch.arange(m)
    hp = h[perm][:, perm]
    hp += percdamp * torch.diag(hp).mean() * torch.eye(m, dtype=torch.float64)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hp)), upper=True)
    grids = {g: ref_grid(w[:, g * group : (g + 1) * group], bits) for g in range(-(-m // group))} if act_order else {}
    wp, q = w[:, perm].clone(), torch.zeros_like(w)
    for i in range(m):
        c = int(perm[i])
        if not act_order and c % group == 0:
            grids[c // group] = ref_grid(wp[:, i : i + group], bits)
        scale, zero = grids[c // group]
        qc = scale[:, 0] * (torch.clamp(torch.round(wp[:, i] / scale[:, 0]) + zero[:, 0], 0, 2**bits - 1) - zero[:, 0])
        q[:, c] = qc
        e = (wp[:, i] - qc) / hinv[i, i]
        wp[:, i + 1 :] -= e[:, None] * hinv[i, i + 1 :][None]
    return q


@pytest.mark.parametrize("act_order", [False, True])
def test_identity_with_column_feedback_changes_nothing(act_order):
    torch.manual_seed(0)
    w = torch.randn(12, 200)
    res = quantize_linear(w, real_hessian(200, 0).float(), build_method("identity"), 64, feedback="column", act_order=act_order)
    w[:, 7] = 0  # the dead column
    torch.testing.assert_close(res.q, w, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits,act_order", [(2, False), (3, True), (4, False), (4, True)])
def test_rtn_grid_with_column_feedback_is_gptq(bits, act_order):
    torch.manual_seed(bits)
    w = torch.randn(24, 200, dtype=torch.float64)
    h = real_hessian(200, bits)
    res = quantize_linear(w, h, build_method("rtn", bits=bits), 64, 0.01, "column", act_order, dtype=torch.float64)
    ref = ref_gptq(w, h, bits, 64, 0.01, act_order)
    assert torch.allclose(res.q.double(), ref, rtol=0, atol=1e-6)
    # and it is not the same as rounding to nearest (the reference is not trivially met)
    rtn = quantize_linear(w, h, build_method("rtn", bits=bits), 64, 0.01, "none", dtype=torch.float64)
    assert not torch.allclose(rtn.q.double(), ref, atol=1e-3)


@pytest.mark.parametrize("method", ["braq", "arb-rc", "sign", "arb"])
def test_column_feedback_not_worse_than_block_feedback(method):
    """tr(ΔW H ΔWᵀ): column feedback below block feedback (up to float noise) on at least 9 of 10 seeds.
    Measured mean gains over the 10 seeds (min): braq 14.8 % (11.8), arb-rc 12.5 % (10.7), sign 13.5 %
    (10.5), arb 12.8 % (10.1)."""
    gains = []
    for seed in range(10):
        torch.manual_seed(seed)
        w = torch.randn(32, 256) * (1 + torch.rand(256))
        h = real_hessian(256, seed).float()
        q = build_method(method)
        block = quantize_linear(w, h, q, 128, feedback="block")
        column = quantize_linear(w, h, q, 128, feedback="column")
        gains.append(1 - column.rel_err / block.rel_err)
    assert sum(g > -1e-5 for g in gains) >= 9, gains
    assert sum(gains) / len(gains) > 0, gains  # mean gain (printed on failure)


def test_column_feedback_keeps_the_stored_parameters():
    """Same masks, scales and means as the block fit on the same block; only the sign planes move."""
    torch.manual_seed(4)
    w = torch.randn(16, 128)
    h = real_hessian(128, 4).float()
    ctx = BlockContext(d=torch.ones(128), h=h, start=0)
    braq = build_method("braq")
    fit = braq.fit_block(w, ctx)
    for j in range(128):
        fit.assign(j, w[:, j] + 0.3 * torch.randn(16))
    res, base = fit.result(), braq.quantize_block(w, ctx)
    for k in base.params:
        if k not in ("signs", "signs2"):
            assert torch.equal(res.params[k], base.params[k]), k
    assert not torch.equal(res.params["signs"], base.params["signs"])
    assert res.bits == base.bits and torch.equal(res.q, braq.decode_block(res.params, (16, 128)))


def test_two_bit_hand_computed():
    """Row [−1, 0, 0.5, 2]: lo = −1, hi = 2, s = 3/3 = 1, z = 1 → codes [0, 1, 2, 3] → x̂ = [−1, 0, 1, 2]
    (0.5 rounds half to even: round(0.5) = 0 → code 1 → 0; numpy/torch round half to even)."""
    w = torch.tensor([[-1.0, 0.0, 0.5, 2.0], [0.2, 0.4, 0.6, 0.8]])
    res = build_method("rtn", bits=2).quantize_block(w, BlockContext(d=torch.ones(4), h=torch.eye(4)))
    # row 2: lo = 0, hi = 0.8, s = fp16(0.8/3), z = 0, codes = round(x / s) = [1, 2, 2, 3]
    s = torch.tensor(0.8 / 3).half().float()
    expected = torch.stack([torch.tensor([-1.0, 0.0, 0.0, 2.0]), s * torch.tensor([1.0, 2.0, 2.0, 3.0])])
    torch.testing.assert_close(res.q, expected)
    assert res.bits.storage == storage_bits(res.params) == 2 * 8 + 2 * 16 + 2 * 2


def test_ternary_hand_computed():
    """Row [3, −3, 0.2, 1]: S_k²/k for k = 1..4 is 9, 18, 16.3, 13.7 → two non-zeros, α = 3 →
    [3, −3, 0, 0] (1 < α/2 = 1.5 → 0)."""
    w = torch.tensor([[3.0, -3.0, 0.2, 1.0]])
    res = build_method("ternary").quantize_block(w, BlockContext(d=torch.ones(4), h=torch.eye(4)))
    torch.testing.assert_close(res.q, torch.tensor([[3.0, -3.0, 0.0, 0.0]]))
    assert res.bits.storage == storage_bits(res.params) == 2 * 4 + 16


@pytest.mark.parametrize("method,opts", [("rtn", {"bits": 3}), ("gptq", {"bits": 2, "sym": True}), ("ternary", {})])
def test_baselines_decode_their_stored_form(method, opts):
    torch.manual_seed(5)
    w = torch.randn(20, 96)
    q = build_method(method, **opts)
    res = quantize_linear(w, real_hessian(96, 5).float(), q, 32, feedback="column")
    for b, blk in enumerate(res.blocks):
        torch.testing.assert_close(q.decode_block(blk, (20, 32)), res.q[:, 32 * b : 32 * (b + 1)], rtol=0, atol=0)
    assert res.bits.storage == sum(storage_bits(b) for b in res.blocks)


def test_method_without_column_assignment_is_refused():
    with pytest.raises(ValueError, match="cannot assign single columns"):
        quantize_linear(torch.randn(4, 16), torch.eye(16), build_method("row-hbraq"), 16, feedback="column")
